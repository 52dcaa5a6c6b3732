"""One reader per source format, registered by name for `mmret prepare SOURCE`. The built-in
readers (`BUILTIN_READERS`) are imported when a reader is first asked for (`get_reader`)."""

from mmret.data.readers.base import BUILTIN_READERS, READER_HELP, READERS, SPLITS, get_reader, register_reader

__all__ = ["BUILTIN_READERS", "READERS", "READER_HELP", "SPLITS", "get_reader", "register_reader"]
