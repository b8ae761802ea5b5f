"""YAML read strictly: a key given twice in one mapping is an error naming the key and both lines. (PyYAML keeps the
last one silently: a second `train:` block would drop the first one's settings back to their defaults.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml import YAMLError

__all__ = ["DuplicateKeyError", "YAMLError", "load_yaml"]


class DuplicateKeyError(YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override keys, as YAML means it to
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise DuplicateKeyError(f"key {key!r} is given twice, on lines {first} and {line} (the second would "
                                        "silently replace the first); merge the two")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, as `yaml.safe_load` reads it, but a duplicate key raises DuplicateKeyError."""
    return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
