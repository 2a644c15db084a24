"""Policies named with their settings: ``csp``, ``csp(cross_ratio=0.25,recent_cap=0.5)``.

A spec is a policy name, optionally followed by ``key=value`` settings in brackets. Its key (the
name a sweep records it under) lists only the settings that differ from the policy's defaults, in
sorted order, so ``csp(n=1.0)`` and ``csp`` are the same key and an earlier record of the bare name
is reused. ``decode_n`` is not a policy setting but how the pruned cache is decoded (the n-softmax
null slot, csp-spec.md section 5); it is accepted in a spec so one sweep can hold that row too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cspkv.pruning.base import PruningPolicy

DECODE_SETTINGS = ("decode_n",)


@dataclass(frozen=True)
class PolicySpec:
    key: str
    name: str
    policy: PruningPolicy
    decode_n: float = 0.0
    settings: dict = field(default_factory=dict, compare=False)   # those that differ from the defaults


def split_specs(text: str) -> list[str]:
    """Comma-separated specs, where commas inside brackets belong to a spec's settings."""
    specs, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in policies {text!r}")
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"unbalanced '(' in policies {text!r}")
    specs.append(current.strip())
    return [s for s in specs if s]


def _value(text: str):
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _format(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def parse_policy(spec: str) -> PolicySpec:
    """The policy a spec names; unknown names, settings and bad values raise ValueError naming them."""
    from cspkv.pruning import get_policy

    spec = spec.strip()
    name, settings = spec, {}
    if "(" in spec:
        if not spec.endswith(")"):
            raise ValueError(f"policy {spec!r}: settings go in brackets at the end, e.g. csp(cross_ratio=0.25)")
        name, inner = spec[:-1].split("(", 1)
        name = name.strip()
        for part in inner.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"policy {spec!r}: setting {part.strip()!r} must be key=value")
            key, value = part.split("=", 1)
            settings[key.strip()] = _value(value.replace("'", "").replace('"', ""))
    decode_n = settings.pop("decode_n", 0.0)
    if isinstance(decode_n, bool) or not isinstance(decode_n, (int, float)) or decode_n < 0:
        raise ValueError(f"policy {spec!r}: decode_n must be a number >= 0, got {decode_n!r}")
    policy = get_policy(name, **settings)
    defaults = get_policy(name).params()
    changed = {k: v for k, v in policy.params().items() if defaults.get(k) != v}
    if decode_n:
        changed["decode_n"] = float(decode_n)
    return PolicySpec(_key(name, changed), name, policy, float(decode_n), changed)


def _key(name: str, settings: dict) -> str:
    return name if not settings else name + "(" + ",".join(f"{k}={_format(v)}" for k, v in sorted(settings.items())) + ")"


def with_settings(spec: str, **settings) -> str:
    """The key of ``spec`` with ``settings`` added or replaced: with_settings("csp(n=0)", pyramid=0.3)."""
    parsed = parse_policy(spec)
    return parse_policy(_key(parsed.name, {**parsed.settings, **settings})).key   # parsed again: defaults drop out
