"""``fsck``: check a whole store: every object against its hash, the SQLite
database's own integrity check, and every recorded reference to an object.

With ``repair``, damaged objects are quarantined (as a load would do), so the
next run that produces the same content writes them anew. A reference to a
missing object cannot be repaired here: the report names the runs that hold
it, to run again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import Store


@dataclass
class FsckReport:
    root: str
    objects_checked: int = 0
    bytes_checked: int = 0
    damaged: list[dict] = field(default_factory=list)        # {"object", "size", "quarantined_to"}
    missing: list[dict] = field(default_factory=list)        # {"object", "flow", "run_id", "step", "task", "name"}
    database_ok: bool = True
    database_messages: list[str] = field(default_factory=list)
    temp_files: int = 0
    quarantined: int = 0
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return self.database_ok and not self.missing and not (self.damaged and not self.repaired)

    def to_json(self) -> dict:
        return {"store": self.root, "ok": self.ok, "repaired": self.repaired,
                "objects_checked": self.objects_checked, "bytes_checked": self.bytes_checked,
                "damaged": self.damaged, "missing": self.missing,
                "database": {"ok": self.database_ok, "messages": self.database_messages},
                "temp_files": self.temp_files, "quarantined": self.quarantined}

    def summary(self) -> str:
        lines = [f"fsck {self.root}: {self.objects_checked} object(s), {self.bytes_checked / 1e6:.1f} MB checked"]
        for d in self.damaged:
            fate = (f"quarantined to {d['quarantined_to']}" if d["quarantined_to"]
                    else "run with --repair to quarantine it")
            lines.append(f"  damaged object {d['object']} ({d['size']} bytes): {fate}")
        for m in self.missing:
            lines.append(f"  missing object {m['object']}: artifact '{m['name']}' of {m['flow']}/{m['run_id']}/"
                         f"{m['step']}/{m['task']}")
        if not self.database_ok:
            lines.append("  database: " + "; ".join(self.database_messages))
        if self.missing:
            runs = sorted({f"{m['flow']}/{m['run_id']}" for m in self.missing})
            lines.append(f"  runs holding lost artifacts (run them again): {', '.join(runs)}")
        if self.quarantined:
            lines.append(f"  {self.quarantined} quarantined object(s) kept in objects/quarantine/ (safe to delete)")
        lines.append("store is consistent" if self.ok else "store has problems")
        return "\n".join(lines) + "\n"


def fsck(store: Store, *, repair: bool = False) -> FsckReport:
    """Check ``store``; with ``repair``, quarantine the damaged objects."""
    report = FsckReport(root=str(store.root), repaired=repair)
    report.database_messages = store.meta.integrity_check()
    report.database_ok = report.database_messages == ["ok"]
    for key in list(store.objects.keys()):
        try:
            size = store.objects.path(key).stat().st_size
        except FileNotFoundError:
            continue  # gc removed it meanwhile
        report.objects_checked += 1
        report.bytes_checked += size
        if not store.objects.verify(key) and store.objects.exists(key):
            moved = store.objects.quarantine(key) if repair else None
            report.damaged.append({"object": key, "size": size, "quarantined_to": str(moved) if moved else None})
    report.missing = _missing_references(store)
    report.temp_files = sum(1 for _ in store.objects.tmp_dir.iterdir())
    report.quarantined = len(store.objects.quarantined())
    return report


def _missing_references(store: Store) -> list[dict]:
    missing = []
    for key, flow, run_id, step, task_id, name in store.meta.artifact_locations():
        if not store.objects.exists(key):
            missing.append({"object": key, "flow": flow, "run_id": run_id, "step": step, "task": task_id,
                            "name": name})
    return missing
