"""`mmret serve`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmret.cli.app import Checkpoint, DataDir, Device, RunsDir, app, command, run_or_zero_shot
from mmret.errors import MmretError


@app.command()
@command
def serve(
    run: Annotated[Optional[str], typer.Option(
        help="Run whose model searches [default: the newest run].",
        show_default=False,
    )] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="Search with a pretrained CLIP as it is instead (e.g. clip-b32); needs --dataset.",
        show_default=False,
    )] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset whose items form the gallery [default: the run's].",
        show_default=False,
    )] = None,
    split: Annotated[str, typer.Option(help="Gallery split: all, train, val or test.")] = "all",
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but 127.0.0.1 / localhost lets other machines in.",
    )] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        help="Also answer requests naming this host (a name, an address or *.example.com; repeat for more). "
             "Besides it only the address listened on and localhost are answered.",
        show_default=False,
    )] = None,
    cors: Annotated[Optional[list[str]], typer.Option(
        help="Let web pages of this origin (e.g. https://example.com) send requests (repeat for more); other "
             "origins' POSTs are refused.",
        show_default=False,
    )] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="MMRET_API_KEY", show_envvar=True,
        help="Require this key (header X-API-Key or Authorization: Bearer) for every route but the page and "
             "/api/health: the API, the media and the API docs.",
        show_default=False,
    )] = None,
    k: Annotated[int, typer.Option("-k", "--top", help="Results the page shows.")] = 24,
    max_k: Annotated[int, typer.Option(help="The most results one request may ask for.")] = 1000,
    max_knn: Annotated[int, typer.Option(
        help="The most results one clip-retrieval /knn-service request may ask for (clip-front's download asks "
             "10000).",
    )] = 10_000,
    max_query_chars: Annotated[int, typer.Option(help="The longest text query, in characters.")] = 1000,
    max_upload_mb: Annotated[float, typer.Option(help="The largest uploaded picture, in MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(
        help="The most pixels (width x height) of an uploaded picture, checked before it is decoded.",
    )] = 40_000_000,
    index: Annotated[str, typer.Option(
        help="exact, or ivf / hnsw (FAISS, needs the faiss extra) for galleries of millions.",
    )] = "exact",
    rebuild_index: Annotated[bool, typer.Option("--rebuild-index", help="Build the cached index again.")] = False,
    checkpoint: Checkpoint = "best",
    device: Device = "auto",
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """Search a gallery from a web page and a JSON API: one process loads the run, the gallery's
    embeddings and the index once, then answers every request. Ctrl-C stops it."""
    import logging

    from mmret.cli import ui

    try:
        from mmret.serve.app import create_app
        from mmret.serve.config import ServeConfig
        from mmret.serve.server import bind, url_of
        from mmret.serve.server import run as run_server
        from mmret.serve.service import SearchService
    except ImportError as e:
        raise MmretError(f"mmret serve needs the serve extra ({e.name} is missing): "
                         "pip install 'mmret[serve]'") from None

    run_dir = run_or_zero_shot(run=run, zero_shot=zero_shot, dataset=dataset, data_dir=data_dir, runs_dir=runs_dir)
    cfg = ServeConfig(run_dir, dataset=dataset, split=split, index=index, rebuild_index=rebuild_index,
                      which=checkpoint, device=device, host=host, port=port, allow_host=tuple(allow_host or ()),
                      cors=tuple(cors or ()), api_key=api_key, k=k, max_k=max_k, max_knn=max_knn,
                      max_query_chars=max_query_chars, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    sock = bind(cfg.host, cfg.port)  # before the minutes of loading: a taken port fails at once
    from mmret.cli import show

    show.say_run(run_dir, checkpoint, newest=not (run or zero_shot))
    service = SearchService.open(cfg, ui.RichReporter())
    log = logging.getLogger("mmret.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    show_serving(service, url_of(sock))
    try:
        run_server(create_app(service), sock, cfg.header_timeout_s)
    finally:
        service.close()


def show_serving(service, url: str) -> None:
    from mmret.cli import ui

    g, cfg = service.gallery, service.cfg
    ui.console.print(f"serving {g.dataset}-{g.split} ({g.n_items:,} {g.modality.plural}, {g.n_captions:,} captions) "
                     f"with run {g.run.name} at [bold]{url}/[/bold]  (API docs: {url}/docs)", highlight=False,
                     soft_wrap=True)
    if not cfg.local_only:
        ui.err_console.print(
            f"[bold red]WARNING: listening on {cfg.host}, not 127.0.0.1: any machine that can reach this one can "
            f"search the gallery and fetch its {g.modality.plural}"
            + (" (with the API key)." if cfg.api_key else ". Set --api-key to require a key.") + "[/bold red]",
            highlight=False, soft_wrap=True)
    ui.console.print("one line per request: time, method, path, status, ms. Ctrl-C stops.", highlight=False)
