"""The codebook: the public description of a dataset, and the only source of keys and bounds.

A codebook is read from YAML (format in `engine/codebooks/FORMAT.md`) into frozen dataclasses.
Researchers browse it; the planner takes every group-by key, filter value and clamp bound from it.
Nothing here ever reads the private data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from engine.errors import CodebookError, InvalidQueryError
from engine.geography import UNKNOWN_REGION, country_name, iso_alpha2_codes, m49_regions

Code = str | int

# ASCII digits only, and short: str.isdigit() admits "²" and int() of a huge string is slow.
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,18}")


class Kind(Enum):
    INTEGER = "integer"
    CATEGORY = "category"
    COUNTRY = "country"
    FLAG = "flag"
    CONCATENATED = "concatenated"


@dataclass(frozen=True)
class Category:
    code: str
    label: str
    description: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Variable:
    """One column of the dataset as the codebook declares it."""

    name: str
    kind: Kind
    definition: str
    number: int | None = None
    missing: str = "missing data"
    aliases: tuple[str, ...] = ()
    categories: tuple[Category, ...] = ()
    low: int | None = None
    high: int | None = None
    unknown_code: str | None = None
    flag_set: str | None = None

    @property
    def stored(self) -> bool:
        """Concatenated label columns are derived from flags and never stored or queried."""
        return self.kind is not Kind.CONCATENATED

    @functools.cached_property
    def codes(self) -> tuple[Code, ...]:
        """The public domain of non-missing values, in display order."""
        if self.kind is Kind.CATEGORY:
            return tuple(c.code for c in self.categories)
        if self.kind is Kind.COUNTRY:
            unknown = (self.unknown_code,) if self.unknown_code else ()
            return unknown + iso_alpha2_codes()
        if self.kind is Kind.FLAG:
            return (0, 1)
        if self.kind is Kind.INTEGER:
            assert self.low is not None and self.high is not None
            return tuple(range(self.low, self.high + 1))
        return ()

    @functools.cached_property
    def code_index(self) -> Mapping[Code, int]:
        return {code: i for i, code in enumerate(self.codes)}

    @functools.cached_property
    def spellings(self) -> Mapping[str, Code]:
        """Every spelling of a category's code (the code itself, its label and aliases, which
        source files and queries may use) to the code. One rule for loads and queries: a
        spelling of two codes is refused when the codebook is read."""
        found: dict[str, Code] = {c.code: c.code for c in self.categories}
        for category in self.categories:
            for spelling in (category.label, *category.aliases):
                known = found.setdefault(spelling, category.code)
                if known != category.code:
                    raise CodebookError(
                        f"{self.name}: {spelling!r} spells both {known!r} and {category.code!r}"
                    )
        return found

    def label_of(self, code: Code) -> str:
        if self.kind is Kind.CATEGORY:
            return next(c.label for c in self.categories if c.code == code)
        if self.kind is Kind.COUNTRY and isinstance(code, str):
            return "Unknown country" if code == self.unknown_code else country_name(code)
        return str(code)

    def parse_value(self, value: object) -> Code:
        """A query value as this variable's code, or InvalidQueryError naming the variable."""
        if self.kind in (Kind.INTEGER, Kind.FLAG):
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
                value = int(value.strip())
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise InvalidQueryError(
                    f"{self.name}: value {_shown(value)} is not an integer", variable=self.name
                )
        elif not isinstance(value, str):
            raise InvalidQueryError(
                f"{self.name}: value {_shown(value)} is not text", variable=self.name
            )
        else:
            value = self.spellings.get(value, value)
        if value not in self.code_index:
            raise InvalidQueryError(
                f"{self.name}: value {_shown(value)} is not in the codebook domain "
                f"({_describe_domain(self)})",
                variable=self.name,
            )
        return value


def _shown(value: object) -> str:
    """A query value as an error message quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe_domain(variable: Variable) -> str:
    if variable.kind is Kind.INTEGER:
        return f"integers {variable.low} to {variable.high}"
    if variable.kind is Kind.COUNTRY:
        return f"ISO 3166-1 alpha-2 codes or {variable.unknown_code!r} for unknown country"
    return ", ".join(repr(c) for c in variable.codes)


@dataclass(frozen=True)
class FlagSet:
    """A multi-response set: one record may have any number of its flags set."""

    name: str
    label: str
    flags: tuple[str, ...]
    definition: str = ""


_NOT_IN_IDENTITY = frozenset({"quasi_identifiers", "sensitive"})

# The columns a release has beside its dimensions' keys (see engine.release), which no variable
# may take as its name in any case: a dimension so named would overwrite one, or be read as one.
CELL_COLUMNS = ("value", "ci_low", "ci_high", "suppressed", "status")
RESERVED_NAMES = frozenset({"flag", *CELL_COLUMNS})


class DerivedKind(Enum):
    M49_REGION = "m49_region"
    M49_SUBREGION = "m49_subregion"
    M49_INTERMEDIATE = "m49_intermediate_region"
    GROUPS = "groups"


@dataclass(frozen=True)
class DerivedDimension:
    """A dimension computed from a stored variable by a public many-to-one mapping."""

    name: str
    source: str
    kind: DerivedKind
    definition: str
    groups: tuple[str, ...]
    mapping: Mapping[Code, str] = field(hash=False, compare=False)


@dataclass(frozen=True)
class Dimension:
    """Something a query may group by or filter on: a stored variable or a derived dimension.

    `keys` are the public key values (missing is always one more key, written None). For a
    derived dimension `source_to_key[i]` is the key index of the source variable's i-th code.
    """

    name: str
    variable: Variable
    keys: tuple[Code, ...]
    derived: DerivedDimension | None = None
    source_to_key: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Number of cells along this dimension, the missing key included."""
        return len(self.keys) + 1

    @property
    def key_is_integer(self) -> bool:
        return self.derived is None and self.variable.kind in (Kind.INTEGER, Kind.FLAG)

    def parse_value(self, value: object) -> Code:
        if self.derived is None:
            return self.variable.parse_value(value)
        if not isinstance(value, str) or value not in self.keys:
            raise InvalidQueryError(
                f"{self.name}: value {_shown(value)} is not one of "
                + ", ".join(repr(k) for k in self.keys),
                variable=self.name,
            )
        return value

    def source_codes_for(self, keys: frozenset[Code]) -> frozenset[Code]:
        """The source variable's codes whose derived key is among `keys`."""
        if self.derived is None:
            return keys
        return frozenset(code for code, group in self.derived.mapping.items() if group in keys)


@dataclass(frozen=True)
class PrivacyUnit:
    description: str
    id_column: str | None = None
    max_rows_per_person: int = 1


@dataclass(frozen=True)
class Codebook:
    """A whole codebook. Build one with `load_codebook` or `Codebook.from_mapping`."""

    name: str
    version: str
    title: str
    description: str
    privacy_unit: PrivacyUnit
    missing_codes: tuple[str, ...]
    min_cell_size: int
    variables: tuple[Variable, ...]
    flag_sets: tuple[FlagSet, ...]
    derived: tuple[DerivedDimension, ...]
    # What `veil risk` assesses when not told: the variables an attacker may know of a person,
    # and those whose value a class of them could disclose.
    quasi_identifiers: tuple[str, ...] = ()
    sensitive: tuple[str, ...] = ()

    @functools.cached_property
    def _variables(self) -> Mapping[str, Variable]:
        return {v.name: v for v in self.variables}

    @functools.cached_property
    def _flag_sets(self) -> Mapping[str, FlagSet]:
        return {f.name: f for f in self.flag_sets}

    @functools.cached_property
    def _dimensions(self) -> Mapping[str, Dimension]:
        dimensions = {v.name: Dimension(v.name, v, v.codes) for v in self.variables if v.stored}
        for d in self.derived:
            source = self._variables[d.source]
            group_index = {g: i for i, g in enumerate(d.groups)}
            dimensions[d.name] = Dimension(
                d.name,
                source,
                d.groups,
                derived=d,
                source_to_key=tuple(group_index[d.mapping[code]] for code in source.codes),
            )
        return dimensions

    @property
    def stored_variables(self) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables if v.stored)

    @property
    def fingerprint_text(self) -> str:
        """The codebook's name and version, as people cite it: `ctdc@7`."""
        return f"{self.name}@{self.version}"

    @functools.cached_property
    def identity(self) -> str:
        """Name, version and a digest of the whole parsed content: `ctdc@7#1f0c...`.

        What a data file records and a release's fingerprint carries. A codebook edited without
        a new version (a code added, a group moved) has another identity, so the engine will not
        place cells of a file loaded with the old one by the new codes, and the ledger will not
        replay releases made under the old one.
        """
        # What `veil risk` checks by default places no cell and releases nothing: left out.
        placed = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_IDENTITY}
        content = json.dumps(placed, sort_keys=True, default=str)
        digest = hashlib.sha256(content.encode()).hexdigest()[:16]
        return f"{self.fingerprint_text}#{digest}"

    def refusal_of(self, loaded_with: str | None) -> str | None:
        """Why a data file that records codebook `loaded_with` cannot be read with this one, or
        None when it can (or records none). Cells and columns are placed by the codebook's
        codes: another codebook would mislabel them."""
        if loaded_with is None or loaded_with == self.identity:
            return None
        if "#" not in loaded_with and loaded_with == self.fingerprint_text:
            return (
                f"the data file records codebook {loaded_with} by name and version only, which "
                f"cannot tell an edited codebook from the one it was loaded with; load it again "
                f"to record {self.identity}"
            )
        return (
            f"the data was loaded with codebook {loaded_with}, not {self.identity} (a different "
            f"name, version or content: an edited codebook, or a veil upgrade that changed a "
            f"shipped one); read it with the codebook it was loaded with, or load it again (a "
            f"new load is a new data version: releases of the old one are not replayed on it, "
            f"and a table asked again is charged again)"
        )

    def variable(self, name: str) -> Variable:
        try:
            return self._variables[name]
        except KeyError:
            raise InvalidQueryError(f"unknown variable {name!r}", variable=name) from None

    def dimension(self, name: str) -> Dimension:
        """A groupable, filterable dimension by name (stored variable or derived)."""
        if name in self._dimensions:
            return self._dimensions[name]
        if name in self._variables:
            raise InvalidQueryError(
                f"{name} is a concatenated label column derived from flag set "
                f"{self._variables[name].flag_set!r}: query its flags instead",
                variable=name,
            )
        raise InvalidQueryError(f"unknown variable {name!r}", variable=name)

    def flag_set(self, name: str) -> FlagSet:
        try:
            return self._flag_sets[name]
        except KeyError:
            raise InvalidQueryError(
                f"unknown flag set {name!r}; known: {', '.join(self._flag_sets)}", variable=name
            ) from None

    def column_for_header(self) -> Mapping[str, Variable]:
        """Every header spelling a source file may use (names and aliases) to its variable."""
        mapping: dict[str, Variable] = {}
        for v in self.variables:
            for header in (v.name, *v.aliases):
                mapping[header] = v
        return mapping

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Codebook:
        return _parse_codebook(raw)


def load_codebook(source: str | Path) -> Codebook:
    """Load a codebook by file path, or by the name of one shipped with veil (`ctdc_v7`)."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        resource = resources.files("engine") / "codebooks" / f"{source}.yaml"
        if not resource.is_file():
            raise CodebookError(f"no codebook file or shipped codebook named {source!r}")
        text = resource.read_text(encoding="utf-8")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CodebookError(f"cannot read codebook {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CodebookError(f"codebook {source} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise CodebookError(f"codebook {source} must be a YAML mapping")
    return _parse_codebook(raw)


@functools.cache
def default_codebook() -> Codebook:
    """The CTDC codebook v7, shipped with veil."""
    return load_codebook("ctdc_v7")


def _require(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise CodebookError(f"{where}: missing required field {key!r}")
    return raw[key]


def _parse_variable(raw: Mapping[str, Any]) -> Variable:
    name = str(_require(raw, "name", "variable"))
    try:
        kind = Kind(_require(raw, "type", name))
    except ValueError:
        raise CodebookError(f"{name}: unknown type {raw['type']!r}") from None
    categories = tuple(
        Category(
            code=str(_require(c, "code", name)),
            label=str(c.get("label", c["code"])),
            description=str(c.get("description", "")),
            aliases=tuple(str(a) for a in c.get("aliases", ()) or ()),
        )
        for c in raw.get("categories", ()) or ()
    )
    low = high = None
    if kind is Kind.INTEGER:
        bounds = _require(raw, "range", name)
        if not (
            isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)
        ):
            raise CodebookError(f"{name}: range must be [low, high] integers")
        low, high = bounds
        if low > high:
            raise CodebookError(f"{name}: range low {low} exceeds high {high}")
    if kind is Kind.CATEGORY and not categories:
        raise CodebookError(f"{name}: a category variable needs categories")
    if len({c.code for c in categories}) != len(categories):
        raise CodebookError(f"{name}: duplicate category codes")
    variable = Variable(
        name=name,
        kind=kind,
        definition=" ".join(str(raw.get("definition", "")).split()),
        number=raw.get("number"),
        missing=str(raw.get("missing", "missing data")),
        aliases=tuple(str(a) for a in raw.get("aliases", ()) or ()),
        categories=categories,
        low=low,
        high=high,
        unknown_code=str(raw["unknown_code"]) if raw.get("unknown_code") is not None else None,
        flag_set=raw.get("flag_set"),
    )
    variable.spellings  # noqa: B018  (refuses a spelling of two codes now, not at a query)
    return variable


def _derived_mapping(
    kind: DerivedKind, source: Variable, raw: Mapping[str, Any]
) -> tuple[tuple[str, ...], dict[Code, str]]:
    if kind is DerivedKind.GROUPS:
        groups_raw = _require(raw, "groups", raw["name"])
        mapping: dict[Code, str] = {}
        for group, members in groups_raw.items():
            for member in members:
                code = source.parse_value(member)
                if code in mapping:
                    raise CodebookError(f"{raw['name']}: {member!r} is in two groups")
                mapping[code] = str(group)
        missing = [c for c in source.codes if c not in mapping]
        if missing:
            raise CodebookError(f"{raw['name']}: source codes without a group: {missing}")
        return tuple(str(g) for g in groups_raw), mapping
    if source.kind is not Kind.COUNTRY:
        raise CodebookError(f"{raw['name']}: {kind.value} needs a country source")
    regions = m49_regions()
    mapping = {}
    for code in source.codes:
        if code == source.unknown_code:
            mapping[code] = UNKNOWN_REGION
        else:
            r = regions[str(code)]
            if kind is DerivedKind.M49_REGION:
                mapping[code] = r.region
            elif kind is DerivedKind.M49_SUBREGION:
                mapping[code] = r.subregion
            else:
                mapping[code] = r.intermediate
    groups = (*sorted(set(mapping.values()) - {UNKNOWN_REGION}), UNKNOWN_REGION)
    return groups, mapping


def _parse_codebook(raw: Mapping[str, Any]) -> Codebook:
    name = str(_require(raw, "name", "codebook"))
    variables = tuple(_parse_variable(v) for v in _require(raw, "variables", name))
    by_name = {v.name: v for v in variables}
    if len(by_name) != len(variables):
        raise CodebookError(f"{name}: duplicate variable names")
    flag_sets = []
    for f in raw.get("flag_sets", ()) or ():
        flags = tuple(str(x) for x in _require(f, "flags", f.get("name", "flag set")))
        for flag in flags:
            if flag not in by_name or by_name[flag].kind is not Kind.FLAG:
                raise CodebookError(f"flag set {f['name']}: {flag!r} is not a flag variable")
        flag_sets.append(
            FlagSet(
                str(f["name"]), str(f.get("label", f["name"])), flags, str(f.get("definition", ""))
            )
        )
    derived = []
    for d in raw.get("derived", ()) or ():
        source_name = str(_require(d, "source", d.get("name", "derived")))
        if source_name not in by_name or by_name[source_name].kind not in (
            Kind.CATEGORY,
            Kind.COUNTRY,
        ):
            raise CodebookError(f"derived {d.get('name')}: source must be a category or country")
        try:
            kind = DerivedKind(_require(d, "kind", d["name"]))
        except ValueError:
            raise CodebookError(f"derived {d['name']}: unknown kind {d['kind']!r}") from None
        groups, mapping = _derived_mapping(kind, by_name[source_name], d)
        derived.append(
            DerivedDimension(
                str(d["name"]), source_name, kind, str(d.get("definition", "")), groups, mapping
            )
        )
    names = [v.name for v in variables] + [f.name for f in flag_sets] + [d.name for d in derived]
    if len(set(names)) != len(names):
        raise CodebookError(f"{name}: names must be unique across variables, flag sets, derived")
    taken = sorted(n for n in names if n.lower() in RESERVED_NAMES)
    if taken:
        raise CodebookError(
            f"{name}: {', '.join(taken)} is the name of a column every release has beside its "
            "keys; call it something else"
        )
    unit = _parse_privacy_unit(name, raw.get("privacy_unit") or {}, by_name)
    k = raw.get("min_cell_size", 10)
    if type(k) is not int or k < 1:
        raise CodebookError(f"{name}: min_cell_size must be a positive integer")
    risk = raw.get("disclosure_risk") or {}
    chosen = {}
    for key in ("quasi_identifiers", "sensitive"):
        chosen[key] = tuple(str(n) for n in risk.get(key, ()) or ())
        for n in chosen[key]:
            if n not in by_name or not by_name[n].stored:
                raise CodebookError(
                    f"{name}: disclosure_risk {key}: {n!r} is not a stored variable"
                )
    return Codebook(
        name=name,
        version=str(_require(raw, "version", name)),
        title=str(raw.get("title", name)),
        description=" ".join(str(raw.get("description", "")).split()),
        privacy_unit=unit,
        missing_codes=tuple(str(c) for c in (raw.get("missing") or {}).get("codes", ("",))),
        min_cell_size=k,
        variables=variables,
        flag_sets=tuple(flag_sets),
        derived=tuple(derived),
        quasi_identifiers=chosen["quasi_identifiers"],
        sensitive=chosen["sensitive"],
    )


def _parse_privacy_unit(
    name: str, raw: Mapping[str, Any], variables: Mapping[str, Variable]
) -> PrivacyUnit:
    """Who one person is: a record, or every record sharing a stored id."""
    id_column = raw.get("id_column")
    bound = raw.get("max_rows_per_person", 1)
    if type(bound) is not int or bound < 1:
        raise CodebookError(f"{name}: privacy_unit.max_rows_per_person must be a positive integer")
    if id_column is not None:
        # The id must be a stored column, or the contribution bound would have nothing to read.
        variable = variables.get(str(id_column))
        if variable is None or variable.kind is Kind.CONCATENATED:
            raise CodebookError(
                f"{name}: privacy_unit.id_column {id_column!r} is not a stored variable"
            )
    return PrivacyUnit(
        description=str(raw.get("description", "one record (one row)")),
        id_column=None if id_column is None else str(id_column),
        max_rows_per_person=bound,
    )
