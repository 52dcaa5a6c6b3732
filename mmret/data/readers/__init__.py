"""One reader per source format, registered by name for `mmret prepare SOURCE`; importing this
package registers them, in the order `--help` lists them."""

from mmret.data.readers.base import READER_HELP, READERS, SPLITS, register_reader
from mmret.data.readers import flickr30k  # noqa: F401, I001
from mmret.data.readers import coco  # noqa: F401
from mmret.data.readers import flickr8k  # noqa: F401
from mmret.data.readers import folder  # noqa: F401
from mmret.data.readers import example  # noqa: F401
from mmret.data.readers import wds  # noqa: F401

__all__ = ["READERS", "READER_HELP", "SPLITS", "register_reader"]
