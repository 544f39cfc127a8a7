"""Components: named groups of parameter tensors that attributions are split by."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .errors import InputError

ComponentSpec = str | Mapping[str, str | Sequence[str]] | Callable[[str], str]


def _matches(name: str, pattern: str) -> bool:
    """A tensor name or a module prefix ("mlp" or "mlp." both match "mlp.fc_in.weight")."""
    return name == pattern or name.startswith(pattern if pattern.endswith(".") else pattern + ".")


def _patterns(spec: Mapping) -> dict[str, list[str]]:
    """Each component's patterns as a list: one string is one pattern (iterating it would make
    each character a prefix, so "0.weight" would also claim "0.bias")."""
    patterns = {}
    for c, value in spec.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
            raise InputError(
                f"components[{c!r}] = {value!r} is not understood: a component's value must be one "
                "tensor name or module prefix, or a list of them, e.g. {'mlp': ['mlp.fc_in', 'mlp.fc_out']}"
            )
        patterns[c] = list(value)
    return patterns


def group_tensors(names: Sequence[str], spec: ComponentSpec = "tensor", *, complete: bool = True,
                  untrained: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Map component name -> tensor names, every tensor in exactly one component.

    spec: "tensor" (one component per tensor), "module" (tensors grouped by the module that
    owns them, e.g. "mlp.fc_in.weight" -> "mlp.fc_in"), a mapping component -> one tensor name
    or module prefix, or a list of them, or a function tensor name -> component name.
    complete=False lets a mapping leave tensors out (in no component); each of its components
    must still match one. `untrained`: the model's other tensor names with why they are not in
    `names` (tied, frozen), for the message about a pattern that matches only those.
    """
    if spec == "tensor":
        return {n: [n] for n in names}
    if spec == "module":
        fn: Callable[[str], str] = lambda n: n.rsplit(".", 1)[0] if "." in n else n
    elif callable(spec):
        fn = spec
    elif isinstance(spec, Mapping):
        spec = _patterns(spec)
        # A pattern that matches nothing is a typo, even beside one that does. Checked before
        # each tensor's owner: the typo is the likely cause of a tensor left in no component.
        unmatched = {c: [p for p in ps if not any(_matches(n, p) for n in names)] for c, ps in spec.items()}
        unmatched = {c: missing for c, missing in unmatched.items() if missing or not spec[c]}
        if unmatched:
            raise InputError(_unmatched(unmatched, names, spec, complete, untrained or {}))

        owners = {n: [c for c, patterns in spec.items() if any(_matches(n, p) for p in patterns)] for n in names}
        problems = _misplaced(owners, complete)
        if problems:  # every tensor named at once: a mapping is fixed in one edit, not one per error
            raise InputError(f"{problems}: each parameter tensor must belong to exactly one component; fix the "
                             "mapping (values are tensor names or module prefixes)")

        def fn(n: str) -> str | None:
            return owners[n][0] if owners[n] else None
    else:
        raise InputError(
            f"components={spec!r} is not understood: use 'tensor', 'module', a mapping "
            "component -> [tensor names or prefixes], or a function name -> component"
        )
    groups: dict[str, list[str]] = {}
    for n in names:
        component = fn(n)
        if component is None and not complete and isinstance(spec, Mapping):
            continue
        if not isinstance(component, str) or not component:  # labels of the cube's component dim
            raise InputError(
                f"components maps {n!r} to {component!r}: component names must be non-empty "
                "strings; fix the function or mapping"
            )
        groups.setdefault(component, []).append(n)
    return groups


def _misplaced(owners: Mapping[str, list[str]], complete: bool) -> str:
    """The tensors a mapping puts in no component (where it must be complete) or in several, in words."""
    orphans = [repr(n) for n, found in owners.items() if not found] if complete else []
    problems = [f"{', '.join(orphans)} {'is' if len(orphans) == 1 else 'are'} in no component"] if orphans else []
    return "; ".join(problems + [f"{n!r} is in components {found}" for n, found in owners.items() if len(found) > 1])


def _unmatched(unmatched: Mapping[str, list[str]], names: Sequence[str], spec: Mapping[str, list[str]],
               complete: bool, untrained: Mapping[str, str]) -> str:
    """Why a mapping's patterns match no trained tensor: they name only tied or frozen tensors,
    or they are typos."""
    reasons = [f"{n!r} is {why}" for n, why in untrained.items()
               if any(_matches(n, p) for patterns in unmatched.values() for p in patterns)]
    if reasons:
        return (f"components {unmatched} (component: patterns) match no trained tensor: {'; '.join(reasons)}. "
                "Fix: leave those patterns out")
    orphans = [n for n in names if not any(_matches(n, p) for ps in spec.values() for p in ps)]
    return (f"components {unmatched} (component: patterns) match no parameter tensor (a typo?): "
            f"patterns must be tensor names or module prefixes of the model, e.g. {list(names)[:4]}"
            + (f"; in no component now: {orphans}" if orphans and complete else ""))
