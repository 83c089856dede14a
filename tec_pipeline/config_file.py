"""Reading a config file: YAML, safely (`yaml.SafeLoader`: no tags that run code) and strictly."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last,
    so a second `data:` block would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' appears twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping, read safely; anything but a non-empty YAML mapping of unique keys
    in a UTF-8 text file is one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML text)") from None
    except ConfigError as err:
        raise ConfigError(f"{path}, {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (no settings in it)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data
