"""The engine's front door: plan, price, measure and release queries in-process.

    engine = Engine(DuckDBBackend("data.duckdb"), codebook=default_codebook())
    plan = engine.plan(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.5"))
    release = engine.release(query, loss=..., charger=ledger, client="alice", request_id="r-1")

`plan` and `dry_run` never touch data. `release` touches data only between a reservation and a
durable commit made by the charger.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from engine.accuracy import (
    NoiseDistribution,
    count_interval_level,
    round_up_amount,
    share_for_scale,
)
from engine.backend import Backend, Cancellation
from engine.codebook import Codebook, Dimension, Kind
from engine.errors import CodebookError, InvalidLossError, QueryCancelledError
from engine.loss import MAX_AMOUNT, MIN_AMOUNT, PrivacyLoss
from engine.noise import NoiseAhead
from engine.planner import Plan, plan_query
from engine.query import Query
from engine.release import (
    Answer,
    Charger,
    Release,
    build_answer,
    empty_cell_bound_of,
    interval_quantiles,
    value_half_width,
)
from engine.settings import Settings
from engine.sql import build, domain_check, group_columns


@dataclass(frozen=True)
class DryRun:
    """What a query would cost and how accurate it would be. Computed without data."""

    loss: PrivacyLoss
    cells: int
    mechanism: str
    noise_scale: float
    tau: int
    half_width: int  # of a count's interval at `confidence`
    confidence: float
    assumed_count: int
    expected_suppressed_share: float  # if every cell's true count were `assumed_count`
    fingerprint: str
    # As in ReleaseMetadata: p0, the chance an empty cell is published, cells x p0, which the
    # expected number of empty cells published never exceeds, and the rows the query's own terms
    # leave empty. A stored release's own (None if it was made before they were recorded).
    empty_pass_probability: float | None
    expected_empty_published_bound: float | None
    unreachable_cells: int | None
    measure: str  # the measure's name, as in ReleaseMetadata
    # About how far a cell's interval reaches either side in the measure's own units (a share,
    # a mean, a sum), for a cell of `assumed_count` records; a count's is `half_width`.
    value_half_width: float
    data_version: str  # the data a release would be drawn from


class Engine:
    """Plans queries against a codebook and answers them from a backend."""

    def __init__(
        self, backend: Backend, *, codebook: Codebook, settings: Settings | None = None
    ) -> None:
        refusal = codebook.refusal_of(backend.codebook())
        if refusal is not None:
            raise CodebookError(refusal)
        kept = backend.run(domain_check(codebook))
        strays = [
            v.name for i, v in enumerate(codebook.stored_variables) if not bool(kept[f"d{i}"][0])
        ]
        if strays:
            # Names only: which values stray, or how many, is the data's to keep.
            raise CodebookError(
                f"the data file does not keep to codebook {codebook.identity}: "
                f"{', '.join(strays)} {'has' if len(strays) == 1 else 'have'} another type or "
                f"values outside the codebook's domain; load it again with `veil load`"
            )
        self.backend = backend
        self.codebook = codebook
        self.settings = settings or Settings(k=codebook.min_cell_size)
        self.data_version = backend.data_version()
        # Files loaded before datasets were named were loaded under the codebook's name.
        self.dataset = backend.dataset() or codebook.name
        # Which load wrote the records (None for files written before loads were named).
        self.load_id = backend.load_id()

    def plan(self, query: Query, *, loss: PrivacyLoss) -> Plan:
        """Validate and price a query. Raises InvalidQueryError before any data is read."""
        return plan_query(query, self.codebook, self.settings, loss)

    def loss_for_half_width(
        self, query: Query, *, half_width: int, confidence: float | None = None
    ) -> PrivacyLoss:
        """The smallest accepted loss (to three significant digits) whose count intervals are at
        most `half_width` on each side.

        `confidence` is the intervals' level (default: the deployment's, 0.95). A share's two
        counts, and a sum's or mean's sum and count, share it as the release's intervals do
        (`count_interval_level`): the target is each count's interval in the release. A loss is
        accepted between `engine.loss.MIN_AMOUNT` and `MAX_AMOUNT`. When even the least accepted
        loss gives narrower intervals than asked, that least loss is returned: it meets the
        target and no smaller one can be charged. When even the largest cannot make them this
        narrow, InvalidLossError says so and gives the narrowest half-width that can be had.
        """
        if half_width < 1:
            raise InvalidLossError("target half-width must be at least 1")
        confidence = self.settings.confidence if confidence is None else confidence
        if not 0.5 <= confidence < 1:
            raise InvalidLossError(f"confidence must lie in [0.5, 1), got {confidence!r}")
        level = count_interval_level(query.measure, confidence)
        probe = self.plan(query, loss=self._loss(Fraction(1)))
        count = next(c for c in probe.components if c.thresholded)
        parts = len(probe.components)
        # Half-width grows with the scale: find the largest scale that still meets the target.
        low, high = 1e-6, 1e9
        for _ in range(80):
            middle = math.sqrt(low * high)
            q = NoiseDistribution(self.settings.accounting, middle).quantile_abs(level)
            low, high = (middle, high) if q <= half_width else (low, middle)
        needed = share_for_scale(self.settings.accounting, count.sensitivity, low) * parts
        if needed > MAX_AMOUNT:
            largest = self._loss(MAX_AMOUNT)
            distribution = self.plan(query, loss=largest).count_mechanism.distribution
            narrowest = distribution.quantile_abs(level)
            if narrowest > half_width:
                raise InvalidLossError(
                    f"no accepted loss gives this query intervals of +/-{half_width} at "
                    f"confidence {confidence}: the largest, {largest}, gives +/-{narrowest}; "
                    f"ask for a half-width of at least {narrowest}"
                )
            return largest
        # Into the accepted range: the least accepted loss meets any wider target, and rounding
        # up may pass the largest, which itself meets the target.
        amount = min(max(round_up_amount(needed), MIN_AMOUNT), MAX_AMOUNT)
        return self._loss(amount)

    def dry_run(
        self,
        query: Query,
        *,
        loss: PrivacyLoss | None = None,
        half_width: int | None = None,
        assumed_count: int | None = None,
    ) -> DryRun:
        """Cost for a target accuracy, or accuracy and expected suppression for a cost."""
        if (loss is None) == (half_width is None):
            raise InvalidLossError("give exactly one of a privacy loss or a target half-width")
        if loss is None:
            assert half_width is not None
            loss = self.loss_for_half_width(query, half_width=half_width)
        plan = self.plan(query, loss=loss)
        distribution = plan.count_mechanism.distribution
        assumed = assumed_count if assumed_count is not None else 2 * self.settings.k
        chance = empty_cell_bound_of(plan)
        return DryRun(
            loss=loss,
            cells=plan.cells,
            mechanism=distribution.mechanism,
            noise_scale=distribution.scale,
            tau=plan.tau,
            half_width=int(interval_quantiles(plan)[0]),  # each count's, as the release takes it
            confidence=self.settings.confidence,
            assumed_count=assumed,
            expected_suppressed_share=1.0 - distribution.publish_probability(assumed, plan.tau),
            fingerprint=plan.fingerprint,
            empty_pass_probability=chance.pass_probability,
            expected_empty_published_bound=chance.expected_published,
            unreachable_cells=plan.unreachable_rows,
            measure=type(plan.query.measure).__name__,
            value_half_width=value_half_width(plan, assumed),
            data_version=self.data_version,
        )

    def answer(self, plan: Plan, *, cancel: Cancellation | None = None) -> Answer:
        """Run the plan's statement, densify over the public domain, add noise, suppress.

        The result is not a release: only a charger's commit turns it into one.
        """
        noise = NoiseAhead(plan.mechanisms, plan.vector_sizes)
        try:
            exact = self._true_components(plan, cancel=cancel)
            # A call cancelled while a large draw runs stops the draw, not only the scan.
            with cancel.calling(noise.discard) if cancel else contextlib.nullcontext():
                noisy = noise.add_to(exact)
        except BaseException:
            noise.discard()
            raise
        return build_answer(plan, noisy, data_version=self.data_version)

    def _true_components(
        self, plan: Plan, *, cancel: Cancellation | None = None
    ) -> list[np.ndarray]:
        """Each component's true integer vector over every cell of the public domain.

        True values: they go to the noise mechanisms and nowhere else.
        """
        result = self.backend.run(build(plan), cancel=cancel)
        columns = [v.name for v in group_columns(plan)]
        cell = np.zeros(len(result["c0"]), dtype=np.int64)
        for dimension in plan.dimensions:
            raw = result[f"k{columns.index(dimension.variable.name)}"]
            cell = cell * dimension.size + key_positions(dimension, raw)
        vectors = []
        column = 0
        for component in plan.components:
            dense = np.zeros((component.blocks, plan.group_cells), dtype=np.int64)
            for block in dense:
                # Several groups land in one cell when a derived dimension merges source codes.
                np.add.at(block, cell, np.asarray(result[f"c{column}"], dtype=np.int64))
                column += 1
            vectors.append(dense.reshape(-1))
        return vectors

    def release(
        self,
        query: Query,
        *,
        loss: PrivacyLoss,
        charger: Charger,
        client: str,
        request_id: str,
        cancel: Cancellation | None = None,
    ) -> Release:
        """Plan, reserve, answer, commit: the only way a release comes into being."""
        plan = self.plan(query, loss=loss)
        reservation = charger.reserve(
            plan, client=client, request_id=request_id, data_version=self.data_version
        )
        if reservation.stored is not None:
            return reservation.stored
        try:
            answer = self.answer(plan, cancel=cancel)
            if cancel is not None and cancel.is_set():
                # The caller has gone: an answer nobody receives must not be charged or stored.
                raise QueryCancelledError("the query was cancelled; nothing was charged")
        except BaseException:
            reservation.cancel()
            raise
        return reservation.commit(answer)

    def _loss(self, amount: Fraction) -> PrivacyLoss:
        return PrivacyLoss(self.settings.accounting, amount)


def key_positions(dimension: Dimension, raw: np.ndarray) -> np.ndarray:
    """Positions along `dimension` of raw stored keys; missing (NULL) is the last position."""
    missing = np.ma.getmaskarray(raw)
    values = np.ma.getdata(raw).astype(np.int64)
    variable = dimension.variable
    if variable.kind is Kind.INTEGER:
        assert variable.low is not None
        values = values - variable.low
    values = np.where(missing, 0, values)
    if dimension.derived is not None:
        values = np.asarray(dimension.source_to_key, dtype=np.int64)[values]
    return np.where(missing, len(dimension.keys), values)
