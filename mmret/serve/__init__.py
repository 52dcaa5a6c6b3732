"""`mmret serve`: a run's gallery searched from a web page and a JSON API, by one process that
loads the run, the gallery's embeddings and its indexes once and answers many requests.

`config` holds what the command is told (`ServeConfig`: run, gallery, address, limits);
`service` the long-lived `SearchService` (the gallery, the worker threads that own the model,
the thumbnails, the limits); `worker` the batching thread; `schemas` the request and response
bodies; `app` the FastAPI app over the service; `server` runs it with uvicorn; `static/` is the
page (plain HTML, CSS and JavaScript: no build step, nothing fetched from elsewhere).

Needs the `serve` extra: `pip install 'mmret[serve]'` (FastAPI, uvicorn, python-multipart,
fastapi-offline for the API docs without a CDN).
"""
