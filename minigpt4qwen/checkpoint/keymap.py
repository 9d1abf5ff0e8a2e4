"""Declarative state-dict key maps and strict loading with a precise report.

A format is described by a list of `KeyRule`s (source key patterns with `{i}` layer placeholders -> target keys,
plus an optional tensor transform). `convert_state_dict` applies them and raises on any key no rule knows, so a
wrong file never half-loads; `load_checked` compares names, shapes and dtypes with the target module first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Transform = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class CheckpointError(ValueError):
    """A checkpoint file does not match what the model expects; the message names the file and the keys."""


@dataclass(frozen=True)
class KeyRule:
    """Maps one group of source keys onto target keys.

    Args:
        sources: source key patterns; `{i}` (and `{j}`) match a layer index. Several sources form one group
            (e.g. `q_bias` + `v_bias` fused into one bias) and must all be present.
        targets: target key patterns using the same placeholders; empty means "drop these keys".
        transform: turns the source tensors (in `sources` order) into the target tensors (in `targets` order);
            None means a one-to-one copy.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...] = ()
    transform: Transform | None = None

    def __post_init__(self) -> None:
        if self.transform is None and len(self.targets) not in (0, len(self.sources)):
            raise ValueError(f"rule {self.sources} -> {self.targets} needs a transform")


def rename(source: str, target: str) -> KeyRule:
    """A one-to-one copy rule."""
    return KeyRule((source,), (target,))


def drop(*sources: str) -> KeyRule:
    """Keys that are recognised and deliberately ignored (non-learned buffers, unused heads)."""
    return KeyRule(tuple(sources))


def _compile(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(escaped + r"\Z")


class KeyMap:
    """A compiled list of rules for one checkpoint format."""

    def __init__(self, name: str, rules: Iterable[KeyRule]):
        self.name = name
        self.rules = list(rules)
        self._compiled = [[_compile(s) for s in rule.sources] for rule in self.rules]

    def match(self, key: str) -> tuple[int, int, dict[str, str]] | None:
        """Returns (rule index, source slot, placeholder bindings) for `key`, or None if no rule knows it."""
        for rule_idx, patterns in enumerate(self._compiled):
            for slot, pattern in enumerate(patterns):
                m = pattern.match(key)
                if m:
                    return rule_idx, slot, m.groupdict()
        return None

    def unknown_keys(self, keys: Iterable[str]) -> list[str]:
        """Keys that no rule of this map recognises."""
        return [k for k in keys if self.match(k) is None]

    def convert(self, state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Applies the rules to a whole state dict.

        Args:
            state_dict: source tensors (meta tensors work: shapes are converted without memory).
            source: the file name, used in error messages.

        Returns:
            The converted state dict (target names).

        Raises:
            CheckpointError: a key no rule knows, or a group with some of its source keys missing.
        """
        groups: dict[tuple[int, tuple[tuple[str, str], ...]], dict[int, str]] = {}
        unknown = []
        for key in state_dict:
            found = self.match(key)
            if found is None:
                unknown.append(key)
                continue
            rule_idx, slot, binding = found
            groups.setdefault((rule_idx, tuple(sorted(binding.items()))), {})[slot] = key
        if unknown:
            raise CheckpointError(
                f"{source}: {len(unknown)} key(s) not part of the {self.name} format, e.g. {_preview(unknown)}. "
                "Is this the right file for this slot?"
            )
        out: dict[str, torch.Tensor] = {}
        for (rule_idx, binding), slots in groups.items():
            rule = self.rules[rule_idx]
            if not rule.targets:
                continue
            names = dict(binding)
            if len(slots) != len(rule.sources):
                missing = [p.format(**names) for s, p in enumerate(rule.sources) if s not in slots]
                raise CheckpointError(f"{source}: incomplete {self.name} checkpoint: missing {_preview(missing)}")
            tensors = [state_dict[slots[s]] for s in range(len(rule.sources))]
            results = rule.transform(tensors) if rule.transform else tensors
            for pattern, tensor in zip(rule.targets, results, strict=True):
                out[pattern.format(**names)] = tensor
        return out


def _preview(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *, allow_missing: bool = False
) -> list[str]:
    """Compares a (converted) state dict with a module's own keys and shapes.

    Args:
        module: the target (may live on the meta device).
        state_dict: tensors named as in `module.state_dict()`.
        source: file name for messages.
        allow_missing: a partial checkpoint (e.g. trainable parameters only) is fine.

    Returns:
        The module keys the checkpoint does not provide (empty unless `allow_missing`).

    Raises:
        CheckpointError: unexpected keys, shape mismatches, or (unless allowed) missing keys.
    """
    expected = module.state_dict(keep_vars=True)
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in state_dict]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if problems:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: " + "; ".join(problems))
    return missing


def load_checked(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *, allow_missing: bool = False
) -> list[str]:
    """Checks, then copies tensors into `module`, casting each to the dtype of the parameter it replaces.

    Parameters still on the meta device are replaced (assigned) rather than copied into, so a model built on
    meta is materialised shard by shard without ever holding two copies.

    Returns:
        The keys left untouched (only when `allow_missing`).
    """
    missing = check_state_dict(module, state_dict, source, allow_missing=allow_missing)
    own = module.state_dict(keep_vars=True)
    for key, value in state_dict.items():
        target = own[key]
        value = value.to(dtype=target.dtype)
        owner_path, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if target.is_meta:
            if isinstance(target, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(value.contiguous(), requires_grad=target.requires_grad))
            else:
                owner._buffers[leaf] = value.contiguous()
        else:
            with torch.no_grad():
                target.copy_(value.to(target.device))
    return missing
