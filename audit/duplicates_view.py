"""Duplicate groups for review: what the duplicate checks found, as groups, and resolving a group in one step.

The checks ``exact_duplicate`` (identical pixels) and ``near_duplicate`` (features or perceptual hashes)
store one ``issues`` row per image they flag, its ``info`` naming its group within the set and, with
``audit run --reference TRAIN_DIR``, the reference-set image it copies. Here the two checks' groups become
one set of groups: images joined by either check are one group (connected components, as the checks
build theirs), so a reviewer decides each copy once. An image that only copies a reference image is a
group of its own, with its reference partners beside it. A group's id is its lowest image index, so any
member names it (``audit duplicates GROUP ...``, the dashboard's buttons).

The groups come from the newest run alone and are built once per run (like :mod:`audit.queries`' per-run
facts); what review changed (each member's current label, by the one fold of the log,
:func:`audit.store.current_sql`) is joined on every call, so 50,000 images in thousands of groups cost
one query per page.

Order: unresolved groups first (a group is resolved when every member has a decision in effect), and
among them those whose labels differ, that is the current label sets of the members still in evaluation,
and the labels of their reference partners, are not all one (the finding that matters: the same picture
under two labels); then the larger groups, then by id.

Resolving a group (:func:`resolve_group`, :data:`RESOLUTIONS`) appends its decisions through
:func:`audit.store.append_decisions`, one transaction for the whole group, so a group is resolved
entirely or not at all; each decision is an ordinary row of the log, undone per image as any other.
``exclude_copies`` records the copies with action ``duplicate`` (excluded from evaluation, reason
``duplicate of <image id>``, which the export writes). Decisions that would change nothing are not
written, so resolving a group twice the same way writes nothing the second time.
"""

from __future__ import annotations

import json
import shlex
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from audit import queries as q
from audit.errors import ReviewError
from audit.store import DecisionRequest, append_decisions, current_labels_sql, current_sql, duplicate_reason, fetch_one

__all__ = [
    "DUPLICATE_CHECKS",
    "RESOLUTIONS",
    "SHOWS",
    "duplicate_groups",
    "group_of",
    "group_rows",
    "member_status",
    "plan_resolution",
    "resolve_group",
]

DUPLICATE_CHECKS = ("exact_duplicate", "near_duplicate")
# How a group can be resolved in one step.
RESOLUTIONS = {
    "keep_all": "keep every image in evaluation with its current label (copies excluded earlier come back)",
    "exclude_copies": "keep one image; exclude the others from evaluation as its duplicates",
    "one_label": "give every image of the group the same single label",
}
# Which groups a listing shows.
SHOWS = {
    "all": "all groups",
    "differ": "groups with different labels",
    "unresolved": "unresolved groups",
    "reference": "groups with copies in the reference set",
}
_CHECK_SHORT = {"exact_duplicate": "exact", "near_duplicate": "near"}


# --------------------------------------------------------------------------- the groups of one run


@dataclass(frozen=True)
class _Groups:
    """The duplicate groups of the newest run: what only ``audit run`` changes."""

    members: pa.Table  # image_index, grp (the group's lowest image index), checks, similarity, hash_distance, ref
    static: pd.DataFrame  # one row per group: grp, checks (the checks that found it), n_ref (reference partners)
    ref_codes: pd.DataFrame  # grp, code: each reference partner's known label (-1: a class this set lacks)
    refs: dict[int, list[dict[str, Any]]]  # grp -> reference partners: id, label (None: unknown), checks, of
    ran: dict[str, str | None]  # each duplicate check the run selected -> None (it ran) or why it was skipped
    reference_root: str | None  # the reference set's folder, for its thumbnails
    last_checks: tuple[str, ...]  # every check the newest run selected (to say how to add the duplicate ones)


_CACHE: OrderedDict[tuple[Any, ...], _Groups] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _groups(con: duckdb.DuckDBPyConnection, db: Path) -> _Groups:
    """The run's groups, built once per run (keyed as :mod:`audit.queries` keys its per-run facts)."""
    return q.per_run(_CACHE, _CACHE_LOCK, con, db, _build)


def _json(text: Any) -> Any:
    """A JSON cell as Python; None for SQL NULL (None or NaN, as pandas hands it over) or text that is not JSON."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _ref_list(text: Any) -> list[str]:
    """The reference ids of a finding's ``info["reference"]``: a string (near_duplicate) or a list (exact_duplicate)."""
    v = _json(text)
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    return [str(x) for x in items if x is not None and str(x) != ""]


def _build(con: duckdb.DuckDBPyConnection) -> _Groups:
    rows = con.execute(
        """
        SELECT "check", image_index,
               TRY_CAST(json_extract(info, '$.group') AS BIGINT) AS grp,
               TRY_CAST(json_extract(info, '$.similarity') AS DOUBLE) AS similarity,
               TRY_CAST(json_extract(info, '$.hash_distance') AS BIGINT) AS hash_distance,
               CAST(json_extract(info, '$.reference') AS VARCHAR) AS ref,
               TRY_CAST(json_extract(info, '$.reference_label') AS BIGINT) AS ref_label,
               CAST(json_extract(info, '$.reference_labels') AS VARCHAR) AS ref_labels
        FROM issues
        WHERE list_contains($checks, "check") AND is_issue
        ORDER BY image_index, "check"
        """,
        {"checks": list(DUPLICATE_CHECKS)},
    ).fetchall()
    skipped = 'SELECT "check", json_extract_string(summary, ?) FROM checks'
    summaries = dict(con.execute(skipped, ["$.skipped"]).fetchall())
    ran = {c: summaries[c] or None for c in DUPLICATE_CHECKS if c in summaries}
    last_checks = tuple(sorted(summaries))
    ref_root = fetch_one(
        con,
        "SELECT json_extract_string(params, ?) FROM runs WHERE json_extract_string(params, ?) IS NOT NULL "
        "ORDER BY started_at DESC LIMIT ?",
        ["$.reference.root", "$.reference.root", 1],
    )
    img = np.array([r[1] for r in rows], dtype=np.int64)
    grp = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=float)
    check = [r[0] for r in rows]
    n = int(img.max()) + 1 if len(img) else 0
    # One node per image; each (check, group) joins its members to its first one. Images that only copy a
    # reference image (no group within the set) are groups of their own.
    ingroup = ~np.isnan(grp)
    code = np.array([DUPLICATE_CHECKS.index(c) for c in check], dtype=np.int64)
    key = code * (n + 1) + np.where(ingroup, np.nan_to_num(grp), 0).astype(np.int64)
    pairs = np.zeros((0, 2), dtype=np.int64)
    if ingroup.any():
        k, i = key[ingroup], img[ingroup]
        order = np.lexsort((i, k))
        k, i = k[order], i[order]
        first_of = np.r_[True, k[1:] != k[:-1]]
        first = np.maximum.accumulate(np.where(first_of, np.arange(len(k)), 0))
        pairs = np.stack([i, i[first]], axis=1)
    from audit.checks.duplicates import duplicate_groups as components

    comp = components(pairs, n) if n else np.zeros(0, dtype=np.int64)
    # A group's id is its lowest image index: stable, and any member names the group.
    lowest = np.full(int(comp.max(initial=-1)) + 1, n, dtype=np.int64)
    members_idx = np.unique(img)
    inc = members_idx[comp[members_idx] >= 0] if n else members_idx
    np.minimum.at(lowest, comp[inc], inc)
    gid = {int(i): (int(lowest[comp[i]]) if comp[i] >= 0 else int(i)) for i in members_idx.tolist()}

    per: dict[int, dict[str, Any]] = {}
    refs: dict[int, dict[str, dict[str, Any]]] = {}
    for chk, i, _, similarity, hash_distance, ref, ref_label, ref_labels in rows:
        i = int(i)
        g = gid[i]
        m = per.setdefault(i, {"checks": [], "similarity": None, "hash_distance": None, "ref": False})
        m["checks"].append(str(chk))
        if chk == "near_duplicate":
            m["similarity"], m["hash_distance"] = similarity, hash_distance
        ids = _ref_list(ref)
        if not ids:
            continue
        m["ref"] = True
        labels: list[int | None] = [None] * len(ids)
        if chk == "near_duplicate" and ref_label is not None:
            labels = [int(ref_label)]
        else:
            got = _json(ref_labels)
            if isinstance(got, list):
                labels = [int(x) if isinstance(x, int) and not isinstance(x, bool) else None for x in got][: len(ids)]
                labels += [None] * (len(ids) - len(labels))
        for rid, lab in zip(ids, labels, strict=True):
            e = refs.setdefault(g, {}).setdefault(rid, {"id": rid, "label": None, "checks": [], "of": []})
            if e["label"] is None and lab is not None:
                e["label"] = lab
            if chk not in e["checks"]:
                e["checks"].append(str(chk))
            if not e["of"] or e["of"][-1] != i:  # rows come by image: a repeat is the last one
                e["of"].append(i)
    order = sorted(per)
    members = pa.table(
        {
            "image_index": pa.array(order, pa.int32()),
            "grp": pa.array([gid[i] for i in order], pa.int32()),
            "checks": pa.array([per[i]["checks"] for i in order], pa.list_(pa.string())),
            "similarity": pa.array([per[i]["similarity"] for i in order], pa.float64()),
            "hash_distance": pa.array([per[i]["hash_distance"] for i in order], pa.int32()),
            "ref": pa.array([per[i]["ref"] for i in order], pa.bool_()),
        }
    )
    by_group: dict[int, set[str]] = {}
    for i in order:
        by_group.setdefault(gid[i], set()).update(per[i]["checks"])
    gs = sorted(by_group)
    ref_lists = {g: sorted(v.values(), key=lambda e: e["id"]) for g, v in refs.items()}
    static = pd.DataFrame(
        {
            "grp": np.array(gs, dtype=np.int64),
            "checks": pd.Series([sorted(by_group[g]) for g in gs], dtype=object),
            "n_ref": np.array([len(ref_lists.get(g, [])) for g in gs], dtype=np.int64),
        }
    )
    # Known training labels only; -1 (a class this set lacks) is a label too, and one that differs from any.
    known = [(g, e["label"]) for g, es in ref_lists.items() for e in es if e["label"] is not None]
    ref_codes = pd.DataFrame(
        {"grp": np.array([g for g, _ in known], dtype=np.int64), "code": pd.array([c for _, c in known], dtype="Int64")}
    )
    return _Groups(members, static, ref_codes, ref_lists, ran, ref_root[0] if ref_root else None, last_checks)


# --------------------------------------------------------------------------- listing


def _note(g: _Groups, db: Path) -> str | None:
    """Why there are no groups to show because the checks did not run (and how to run them); None when one ran."""
    if any(why is None for why in g.ran.values()):
        return None
    wanted = ",".join(dict.fromkeys([*g.last_checks, *DUPLICATE_CHECKS]))
    run = f"audit run --db {shlex.quote(str(db))} --checks {wanted}"
    if not g.ran:
        return (
            "the duplicate checks (exact_duplicate, near_duplicate) did not run on this workspace: its last run did "
            f"not select them. Run them (the images already scored are not scored again): {run}"
        )
    skipped = "; ".join(f"{c} {str(why).removeprefix('skipped: ')}" for c, why in g.ran.items())
    return (
        f"the duplicate checks were skipped: {skipped}. They need pixel statistics, which a zoo model's scoring "
        "gathers (prediction files give none), or a zoo model's features: rerun 'audit run' on this workspace "
        "with a zoo model among --models (see 'audit models')"
    )


def _members_src(where: str = "") -> str:
    """SQL: the CTE ``src``, the review log of the images in ``dup_members`` (``where``: of some groups only), for
    :func:`audit.store.current_sql` to fold: folding only these images' rows is what keeps a page fast."""
    return f"""src AS (
        SELECT image_index, decision_id, action, new_labels, reviewer FROM decisions
        WHERE image_index IN (SELECT image_index FROM dup_members {where}))"""


_SUMMARY_COLUMNS = ["grp", "size", "n_kept", "n_copies", "n_reviewed", "given_differ", "labels_differ", "resolved"]
_MULTI = 1 << 40  # codes of label sets of two or more classes start here (a single class's code is its index)
_SUMMARY_CACHE: OrderedDict[tuple[Any, ...], pd.DataFrame] = OrderedDict()


def _summaries(con: duckdb.DuckDBPyConnection, g: _Groups, db: Path) -> pd.DataFrame:
    """One row per group, with what review has made of it, in listing order (see the module docstring).

    Cached per data version (:func:`audit.queries.data_version`): paging through the groups costs nothing more.
    """
    key = (str(db.resolve()), q.data_version(db))  # a new run or decision changes the version
    with _CACHE_LOCK:
        hit = _SUMMARY_CACHE.get(key)
    if hit is not None:
        return hit
    con.register("dup_members", g.members)
    try:
        got = con.execute(
            f"""
            WITH {_members_src()}, {current_sql("last", "src")}
            SELECT d.grp, i.label, l.labels, coalesce(l.reviewed, false), coalesce(l.action = 'duplicate', false)
            FROM dup_members d JOIN images i USING (image_index) LEFT JOIN last l USING (image_index)
            """
        ).fetchall()
    finally:
        con.unregister("dup_members")
    # Each member's current label set as one code: its class where it has one class, a code per distinct set of
    # several (rare), None where it is left out; the groups' "labels differ" is then a count of distinct codes.
    sets: dict[tuple[int, ...], int] = {}
    grp = np.fromiter((r[0] for r in got), dtype=np.int64, count=len(got))
    given = np.fromiter((-1 if r[1] is None else r[1] for r in got), dtype=np.int64, count=len(got))
    code = np.full(len(got), -2, dtype=np.int64)  # -2: left out of evaluation
    for k, (_, label, labels, _, _) in enumerate(got):
        cur = ([label] if label is not None and label >= 0 else []) if labels is None else sorted(set(labels))
        if len(cur) == 1:
            code[k] = cur[0]
        elif cur:
            code[k] = sets.setdefault(tuple(cur), _MULTI + len(sets))
    df = pd.DataFrame(
        {
            "grp": grp,
            "given": np.where(given >= 0, given, np.nan),
            "code": pd.Series(code, dtype="Int64").where(code != -2),
            "reviewed": np.fromiter((r[3] for r in got), dtype=bool, count=len(got)),
            "copy": np.fromiter((r[4] for r in got), dtype=bool, count=len(got)),
        }
    )
    by = df.groupby("grp", sort=True)
    out = pd.DataFrame(
        {
            "size": by.size(),
            "n_kept": by["code"].count(),
            "n_copies": by["copy"].sum(),
            "n_reviewed": by["reviewed"].sum(),
            "given_differ": by["given"].nunique() > 1,
        }
    )
    # Labels differ: distinct codes among the images in evaluation and the reference partners' labels together.
    codes = pd.concat([df[["grp", "code"]].dropna(), g.ref_codes], ignore_index=True)
    out["labels_differ"] = (codes.groupby("grp")["code"].nunique() > 1).reindex(out.index, fill_value=False)
    out["resolved"] = out["n_reviewed"] == out["size"]
    out = out.reset_index().merge(g.static, on="grp", how="left")
    order = ["resolved", "labels_differ", "n_ref", "size", "grp"]
    out = out.sort_values(order, ascending=[True, False, False, False, True], kind="stable").reset_index(drop=True)
    out = out.astype({"size": int, "n_kept": int, "n_copies": int, "n_reviewed": int, "n_ref": int})
    with _CACHE_LOCK:
        _SUMMARY_CACHE[key] = out
        while len(_SUMMARY_CACHE) > 8:
            _SUMMARY_CACHE.popitem(last=False)
    return out


def _shown(df: pd.DataFrame, show: str) -> pd.DataFrame:
    if show == "differ":
        return df[df["labels_differ"]]
    if show == "unresolved":
        return df[~df["resolved"]]
    if show == "reference":
        return df[df["n_ref"] > 0]
    return df


def _member_rows(con: duckdb.DuckDBPyConnection, g: _Groups, groups: Sequence[int]) -> pd.DataFrame:
    """Every member of ``groups``: its image, given and current labels, the decision in effect and its reason."""
    con.register("dup_members", g.members)
    try:
        df = con.execute(
            f"""
            WITH {_members_src("WHERE list_contains($groups, grp)")}, {current_sql("last", "src")}
            SELECT d.grp, d.image_index, i.image_id, i.label, i.valid,
                   {current_labels_sql("l", "i")} AS current_labels,
                   coalesce(l.reviewed, false) AS reviewed, l.action, x.reason, e.depth,
                   d.checks, d.similarity, d.hash_distance, d.ref
            FROM dup_members d
            JOIN images i USING (image_index)
            LEFT JOIN last l USING (image_index)
            LEFT JOIN last_end e USING (image_index)
            LEFT JOIN decisions x ON x.decision_id = l.decision_id
            WHERE list_contains($groups, d.grp)
            ORDER BY d.grp, d.image_index
            """,
            {"groups": [int(x) for x in groups]},
        ).df()
    finally:
        con.unregister("dup_members")
    q._add_names(con, df)
    df["checks"] = pd.Series([list(v) for v in df["checks"]], index=df.index, dtype=object)
    for col in ("similarity", "hash_distance", "depth"):
        df[col] = pd.Series([q._plain(v) for v in df[col]], index=df.index, dtype=object)
    return df


def _reference_rows(
    con: duckdb.DuckDBPyConnection, g: _Groups, groups: Sequence[int]
) -> dict[int, list[dict[str, Any]]]:
    """Each group's reference partners with their labels' names (None: unlabelled or not known)."""
    refs = {int(x): g.refs.get(int(x), []) for x in groups}
    known = {e["label"] for es in refs.values() for e in es if e["label"] is not None and e["label"] >= 0}
    names = q._names(con, known)

    def name(lab: int | None) -> str | None:
        return None if lab is None else "(a class this set lacks)" if lab < 0 else names.get(lab, str(lab))

    return {grp: [{**e, "label_name": name(e["label"])} for e in es] for grp, es in refs.items()}


def duplicate_groups(
    db: str | Path | q.Reader, show: str = "all", page: int = 0, page_size: int = 10, members: int | None = None
) -> dict[str, Any]:
    """One page of the duplicate groups of the newest run, in review order, and what the run found in all.

    Parameters
    ----------
    show : str
        One of :data:`SHOWS`.
    page, page_size : int
        The page (from 0; past the end: the last page) and groups per page.
    members : int, optional
        Members listed per group (the rest are counted in ``more``); None: all.

    Returns
    -------
    dict
        ``note`` (why there are no groups: the duplicate checks did not run, and how to run them; None
        when one ran), ``checks`` (each duplicate check the run selected -> None when it ran, else why it
        was skipped), ``counts`` (groups, images, differ, unresolved, reference: over every group),
        ``total`` (groups that ``show`` selects), ``page`` (the page given), ``reference_root`` and
        ``groups``: a list of dicts with group (its id: the lowest image index), size, n_kept (still in
        evaluation), n_copies (excluded as duplicates), n_reviewed, resolved, labels_differ (now, among
        the images still in evaluation and the reference partners' labels), given_differ, checks,
        n_ref, members (a frame: image_index, image_id, label, given, current_labels, current,
        reviewed, action and reason of the decision in effect, checks, similarity, hash_distance, ref
        (it copies a reference image)), more (members not listed) and reference (its reference partners:
        id, label, label_name, checks, of).
    """
    if show not in SHOWS:
        raise ReviewError(f"unknown group selection {show!r}; use one of {', '.join(SHOWS)}")
    page, page_size = max(int(page), 0), max(int(page_size), 1)
    with q._open(db) as con:
        g = _groups(con, q._path(db))
        note = _note(g, q._path(db))
        summary = _summaries(con, g, q._path(db))
        sel = _shown(summary, show)
        last_page = max(0, (len(sel) - 1) // page_size)
        page = min(page, last_page)
        rows = sel.iloc[page * page_size : (page + 1) * page_size]
        mem = _member_rows(con, g, rows["grp"].tolist()) if len(rows) else None
        refs = _reference_rows(con, g, rows["grp"].tolist())
    groups = []
    for r in rows.itertuples(index=False):
        mine = mem[mem["grp"] == r.grp].reset_index(drop=True) if mem is not None else pd.DataFrame()
        shown = mine if members is None else mine.iloc[: max(int(members), 1)]
        groups.append(
            {
                "group": int(r.grp),
                "size": int(r.size),
                "n_kept": int(r.n_kept),
                "n_copies": int(r.n_copies),
                "n_reviewed": int(r.n_reviewed),
                "resolved": bool(r.resolved),
                "labels_differ": bool(r.labels_differ),
                "given_differ": bool(r.given_differ),
                "checks": [str(c) for c in r.checks],
                "n_ref": int(r.n_ref),
                "members": shown,
                "more": len(mine) - len(shown),
                "reference": refs[int(r.grp)],
            }
        )
    return {
        "note": note,
        "checks": dict(g.ran),
        "counts": {
            "groups": len(summary),
            "images": int(summary["size"].sum()) if len(summary) else 0,
            "differ": int(summary["labels_differ"].sum()) if len(summary) else 0,
            "unresolved": int((~summary["resolved"]).sum()) if len(summary) else 0,
            "reference": int((summary["n_ref"] > 0).sum()) if len(summary) else 0,
        },
        "total": len(sel),
        "page": page,
        "reference_root": g.reference_root,
        "groups": groups,
    }


def group_of(db: str | Path | q.Reader, image_index: int) -> dict[str, Any]:
    """The whole group that image ``image_index`` belongs to (every member listed), as :func:`duplicate_groups`
    gives a group.

    Raises
    ------
    ReviewError
        The image is in no duplicate group of the newest run (or the duplicate checks did not run).
    """
    idx = int(image_index)
    with q._open(db) as con:
        g = _groups(con, q._path(db))
        m = g.members
        hit = np.flatnonzero(m.column("image_index").to_numpy() == idx)
        if not len(hit):
            note = _note(g, q._path(db))
            raise ReviewError(
                f"image {idx} is in no duplicate group of the last run; "
                + (note if note else "see 'audit duplicates' for the groups and their ids")
            )
        grp = int(m.column("grp")[int(hit[0])].as_py())
        summary = _summaries(con, g, q._path(db))
        mem = _member_rows(con, g, [grp])
        refs = _reference_rows(con, g, [grp])[grp]
    r = summary[summary["grp"] == grp].iloc[0]
    return {
        "group": grp,
        "size": int(r["size"]),
        "n_kept": int(r["n_kept"]),
        "n_copies": int(r["n_copies"]),
        "n_reviewed": int(r["n_reviewed"]),
        "resolved": bool(r["resolved"]),
        "labels_differ": bool(r["labels_differ"]),
        "given_differ": bool(r["given_differ"]),
        "checks": [str(c) for c in r["checks"]],
        "n_ref": int(r["n_ref"]),
        "members": mem,
        "more": 0,
        "reference": refs,
    }


def member_status(m: Mapping[str, Any]) -> str:
    """One member's review state in words: a duplicate decision's reason (``duplicate of <image id>``), etc."""
    if m.get("valid") is False:
        return "bad image: left out"
    if m["action"] == "duplicate":
        return f"excluded: {m['reason']}" if m.get("reason") else "excluded: a duplicate"
    if not m["reviewed"]:
        return "not reviewed"
    if not m["current_labels"]:
        return "excluded: no class fits"
    return f"reviewed ({m['action']})"


def group_rows(groups: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The groups of :func:`duplicate_groups` / :func:`group_of` as one row per image (the CLI's listing).

    Columns: group, differ (labels differ now), resolved, image_index (None for a reference image), image
    (its id, or the reference image's path), given (label name; a reference image's label), current, status
    (see :func:`member_status`; ``reference set`` for a reference image), checks.
    """
    rows = []
    for g in groups:
        head = {"group": g["group"], "differ": g["labels_differ"], "resolved": g["resolved"]}
        for m in g["members"].to_dict("records"):
            found = [_CHECK_SHORT.get(c, c) for c in m["checks"]] + (["reference"] if m["ref"] else [])
            rows.append(
                {
                    **head,
                    "image_index": int(m["image_index"]),
                    "image": m["image_id"],
                    "given": m["given"],
                    "current": m["current"],
                    "status": member_status(m),
                    "checks": ",".join(found),
                }
            )
        for e in g["reference"]:
            rows.append(
                {
                    **head,
                    "image_index": None,
                    "image": e["id"],
                    "given": e["label_name"],
                    "current": None,
                    "status": "reference set",
                    "checks": ",".join(_CHECK_SHORT.get(c, c) for c in e["checks"]),
                }
            )
    cols = ["group", "differ", "resolved", "image_index", "image", "given", "current", "status", "checks"]
    return pd.DataFrame(rows, columns=cols).astype({"image_index": "Int64"})


# --------------------------------------------------------------------------- resolving


def _restore(m: Mapping[str, Any]) -> list[DecisionRequest]:
    """Bring back a member excluded as a duplicate: withdraw that decision, and keep it if nothing else is left."""
    idx = int(m["image_index"])
    out = [DecisionRequest(idx, "undo")]
    if (m["depth"] or 0) <= 1:  # the undo leaves no decision in effect: the given label, confirmed
        out.append(DecisionRequest(idx, "keep"))
    return out


def plan_resolution(
    group: Mapping[str, Any], how: str, *, keep: int | None = None, label: int | None = None, note: str = ""
) -> list[DecisionRequest]:
    """The decisions that resolve ``group`` (from :func:`group_of`) as ``how`` says, none that would change nothing.

    Parameters
    ----------
    how : str
        One of :data:`RESOLUTIONS`. ``keep_all``: every member without a decision in effect is kept as
        given; a member excluded as a duplicate is brought back (that decision withdrawn). ``exclude_copies``:
        ``keep`` stays (kept as given if undecided, brought back if excluded as a duplicate), every other
        member is recorded as a ``duplicate`` of it; without ``keep`` (a group with reference partners) every
        member is recorded as a duplicate of its reference image. ``one_label``: every member gets
        ``label`` (``keep`` where that is its given label, ``relabel`` otherwise).
    note : str
        The reviewer's reason; a duplicate decision's reason is ``duplicate of <image id>; <note>``.

    Raises
    ------
    ReviewError
        Unknown ``how``, ``keep`` not a member, ``label`` missing for ``one_label``, or neither ``keep`` nor a
        reference partner for ``exclude_copies``.
    """
    if how not in RESOLUTIONS:
        raise ReviewError(f"unknown resolution {how!r}; use one of {', '.join(RESOLUTIONS)}")
    members = group["members"].to_dict("records")
    by_index = {int(m["image_index"]): m for m in members}
    gid = group["group"]
    if keep is not None and int(keep) not in by_index:
        raise ReviewError(
            f"image {keep} is not in duplicate group {gid} (its images: "
            f"{', '.join(map(str, sorted(by_index)[:12]))}{', ...' if len(by_index) > 12 else ''}); "
            "name one of them to keep"
        )
    reqs: list[DecisionRequest] = []
    if how == "keep_all":
        for m in members:
            if m["action"] == "duplicate":
                reqs += _restore(m)
            elif not m["reviewed"]:
                reqs.append(DecisionRequest(int(m["image_index"]), "keep"))
        return reqs
    if how == "one_label":
        if label is None:
            raise ReviewError(f"resolution 'one_label' needs the label for group {gid}: pass --label CLASS")
        for m in members:
            current = tuple(int(x) for x in (m["current_labels"] or []))
            if m["reviewed"] and current == (int(label),):
                continue
            given = m["label"] is not None and int(m["label"]) == int(label)
            idx = int(m["image_index"])
            reqs.append(DecisionRequest(idx, "keep") if given else DecisionRequest(idx, "relabel", (int(label),)))
        return reqs
    # exclude_copies
    refs = group["reference"]
    if keep is None and not refs:
        raise ReviewError(
            f"resolution 'exclude_copies' needs the image to keep in group {gid}: pass --keep IMAGE "
            f"(one of {', '.join(map(str, sorted(by_index)[:12]))})"
        )
    first_ref = refs[0]["id"] if refs else None
    own_ref = {i: e["id"] for e in reversed(refs) for i in e["of"]}  # each member's first reference partner
    for m in members:
        idx = int(m["image_index"])
        if keep is not None and idx == int(keep):
            if m["action"] == "duplicate":
                reqs += _restore(m)
            elif not m["reviewed"]:
                reqs.append(DecisionRequest(idx, "keep"))
            continue
        if keep is not None:
            head = duplicate_reason(str(by_index[int(keep)]["image_id"]))
            req = DecisionRequest(idx, "duplicate", of=int(keep))
        else:
            ref = own_ref.get(idx, first_ref)
            head = duplicate_reason(str(ref), reference=True)
            req = DecisionRequest(idx, "duplicate", of_reference=str(ref))
        stored = str(m["reason"] or "")
        if m["action"] == "duplicate" and (stored == head or stored.startswith(head + "; ")):
            continue  # already excluded as a copy of that image (whatever note it was saved with)
        reqs.append(req)
    return reqs


def resolve_group(
    db: str | Path,
    group: int,
    how: str,
    *,
    keep: int | None = None,
    label: int | None = None,
    reviewer: str | None = None,
    reason: str = "",
    timeout: float = 30.0,
) -> list[int]:
    """Resolve the duplicate group that image ``group`` is in, in one transaction; return the decision ids.

    See :func:`plan_resolution` for what each resolution records. An empty list: the group already
    stands as ``how`` would leave it, and nothing was written.

    Raises
    ------
    ReviewError
        As :func:`group_of` and :func:`plan_resolution`, or :func:`audit.store.append_decisions` (nothing is
        written then).
    """
    with q.DB_LOCK:  # this process's reads and writes of the file are serialised (audit.queries)
        g = group_of(db, group)
        reqs = plan_resolution(g, how, keep=keep, label=label, note=reason)
        # The store checks each decision (labels in the label space, images in the workspace) before any is written.
        return append_decisions(db, reqs, reviewer=reviewer, reason=reason, timeout=timeout)
