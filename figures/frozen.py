"""The frozen criteria (issue 16 item 7): each figure's pre-registered verdict rule and its SHA-256.

Pre-registration means: everything that decides a figure's verdict is declared, hashed and committed *before* the
numbers that judge it exist. :func:`declaration` is that "everything", for one figure, as plain JSON values:

- ``id``, ``kind``, ``claim_id`` and the ``claim`` text;
- ``criterion``: :meth:`figures.criteria.Criterion.as_dict` (every test: quantity, direction, margin and where it
  comes from, method, why, role; the rule, alpha, the correction, the recalibrations, the note), less the rendered
  prose ``description`` (a pure rendering of the other fields: a fix of the renderer is no change of criterion);
- ``protocols``: every :meth:`figures.framework.Protocol.as_dict` (settings, primary, paper, plausible, note);
- ``headline``: the headline-protocol policy applied to this figure (:func:`headline_policy`).

:func:`sha256` hashes its canonical JSON (sorted keys, no whitespace, ASCII). :func:`write` writes the registry
file ``figures/FROZEN.json`` (figures sorted by id, each with its hash and its declaration, so that a diff of the file
shows what changed): ``lora-theory figures --freeze [ID ...]`` (only those figures) or ``make freeze`` (all). The registry is committed on its own
before any confirmatory run; :func:`registry_commit` names that commit. A figure run records in its JSON's
``confirmation`` the hash of the code's declaration (``criteria_sha256``); the tests check it against the committed
registry, and the registry against the code: a changed criterion fails until it is frozen again, and a criterion
frozen again needs a new confirmation on new seeds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from figures.framework import Spec, headline_protocols, jsonable

_HERE = Path(__file__).resolve().parent
REGISTRY = _HERE / "FROZEN.json"
ABOUT = ("Pre-registered verdict rules (issue 16 item 7): per figure, everything that decides its verdict (claim, "
         "kind, criterion, protocols, headline-protocol policy) and the SHA-256 of its canonical JSON. Written by "
         "`lora-theory figures --freeze` (figures/frozen.py); committed on its own before the confirmatory run. "
         "Do not edit by hand.")
_RENDERED = ("description",)  # Criterion.as_dict() keys that are renderings of the declared fields, not declarations


def headline_policy(spec: Spec) -> dict:
    """The headline-protocol policy (:data:`figures.framework.HEADLINE_POLICY`) as it applies to ``spec``: ``rule``
    "paper" (the primary protocol is the paper's: the headline verdict is its), "plausible" (the verdict combined
    over the plausible protocols) or "primary" (a figure without plausible marks: the primary alone), and the
    ``protocols`` whose verdicts make the headline (:func:`figures.framework.headline_protocols`)."""
    names = [p.name for p in headline_protocols(spec.protocols)]
    primary = next(p for p in spec.protocols if p.primary)
    rule = "paper" if primary.paper else "plausible" if any(p.plausible for p in spec.protocols) else "primary"
    return {"rule": rule, "protocols": names}


def declaration(spec: Spec) -> dict:
    """Everything that decides ``spec``'s verdict, as JSON values (see the module docstring)."""
    criterion = {k: v for k, v in spec.criterion.as_dict().items() if k not in _RENDERED}
    return jsonable({"id": spec.id, "kind": spec.kind, "claim_id": spec.claim_id, "claim": spec.claim,
                     "criterion": criterion, "protocols": [p.as_dict() for p in spec.protocols],
                     "headline": headline_policy(spec)})


def canonical_json(obj) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256(decl: dict) -> str:
    """The SHA-256 (hex) of :func:`canonical_json` of a declaration."""
    return hashlib.sha256(canonical_json(decl).encode("ascii")).hexdigest()


def criteria_sha256(spec: Spec) -> str:
    """The hash of ``spec``'s declaration as the code states it now."""
    return sha256(declaration(spec))


def registry_of(specs: dict[str, Spec]) -> dict:
    """The registry's content for ``specs`` (id -> Spec): ``{"about", "figures": {id: {"sha256", "declaration"}}}``,
    figures sorted by id."""
    figs = {}
    for fig_id in sorted(specs):
        decl = declaration(specs[fig_id])
        figs[fig_id] = {"sha256": sha256(decl), "declaration": decl}
    return {"about": ABOUT, "figures": figs}


def render(registry: dict) -> str:
    """The registry file's text (stable: sorted keys, one-space indent, trailing newline)."""
    return json.dumps(registry, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def write(specs: dict[str, Spec] | None = None, path: Path | None = None, ids: list[str] | None = None) -> Path:
    """Freeze: write the registry of ``specs`` (default: every registered figure) to ``path``. With ``ids``, only
    those figures' entries are added or updated; the others stay as the file has them (a freeze paper by paper)."""
    from figures import registry
    from toymodels.cache import atomic_write_bytes

    path = path if path is not None else REGISTRY
    specs = specs if specs is not None else registry.specs()
    if ids is not None:
        unknown = [i for i in ids if i not in specs]
        if unknown:
            raise ValueError(f"ids: unknown figure ids {unknown}")
        content = load(path) if path.exists() else {"about": ABOUT, "figures": {}}
        content["about"] = ABOUT
        content["figures"].update(registry_of({i: specs[i] for i in ids})["figures"])
        content["figures"] = dict(sorted(content["figures"].items()))
    else:
        content = registry_of(specs)
    atomic_write_bytes(path, render(content).encode())
    return path


def load(path: Path | None = None) -> dict:
    """The committed registry (FileNotFoundError naming the file and how to write it)."""
    path = path if path is not None else REGISTRY
    if not path.exists():
        raise FileNotFoundError(f"no frozen registry {path}: `lora-theory figures --freeze` writes it")
    return json.loads(path.read_text())


def hashes(path: Path | None = None) -> dict[str, str]:
    """id -> frozen SHA-256 of the registry at ``path``."""
    return {fig_id: entry["sha256"] for fig_id, entry in load(path)["figures"].items()}


def differences(specs: dict[str, Spec] | None = None, path: Path | None = None) -> list[str]:
    """How the code's declarations differ from the registry at ``path`` (empty when they agree): one line per
    figure missing from either side or whose hash differs, naming the fields that changed."""
    from figures import registry

    specs = specs if specs is not None else registry.specs()
    frozen = load(path)["figures"]
    out = [f"{i}: not in the registry" for i in specs if i not in frozen]
    out += [f"{i}: in the registry but not a registered figure" for i in frozen if i not in specs]
    for fig_id, spec in specs.items():
        if fig_id not in frozen:
            continue
        decl = declaration(spec)
        if sha256(decl) != frozen[fig_id]["sha256"]:
            old = frozen[fig_id].get("declaration") or {}
            changed = sorted(k for k in set(decl) | set(old) if decl.get(k) != old.get(k)) or ["(the hash only)"]
            out.append(f"{fig_id}: declaration changed since the freeze ({', '.join(changed)})")
    return out


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=_HERE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def head_commit() -> str:
    """The git commit checked out (HEAD), "unknown" outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


def registry_commit(path: Path | None = None) -> str:
    """The last commit that changed the registry file, "unknown" outside a git checkout; "uncommitted" when the file
    was never committed or differs from that commit (a freeze not committed yet)."""
    path = path if path is not None else REGISTRY
    commit = _git("log", "-1", "--format=%H", "--", str(path))
    if commit is None:
        return "uncommitted" if path.exists() and head_commit() != "unknown" else "unknown"
    return "uncommitted" if _git("status", "--porcelain", "--", str(path)) else commit


def freeze_commit(sha: str, path: Path | None = None) -> str:
    """The commit that froze a declaration: the last commit that added the hash ``sha`` to the registry file (git's
    pickaxe); "uncommitted" when the committed registry does not hold it, "unknown" outside a git checkout. A figure's
    pre-registration is this commit, whatever later commits froze other figures."""
    path = path if path is not None else REGISTRY
    if head_commit() == "unknown":
        return "unknown"
    if sha not in (_git("show", f"HEAD:{path.relative_to(_git_root())}") or ""):
        return "uncommitted"
    return _git("log", "-1", "--format=%H", "-S", sha, "--", str(path)) or "uncommitted"


def _git_root() -> Path:
    return Path(_git("rev-parse", "--show-toplevel") or _HERE.parent)


def commit_time(commit: str) -> str | None:
    """The committer date of ``commit`` (ISO 8601), None when git does not know it."""
    return _git("show", "-s", "--format=%cI", commit)
