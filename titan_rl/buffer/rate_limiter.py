"""Keeps learner updates and collected env steps at a fixed ratio (Reverb's SampleToInsertRatio).

With `spi` rows sampled per inserted transition, `diff = inserts * spi - sampled_rows`
must stay within `min_size * spi ± slack * spi`: collection may run at most `slack` env
steps ahead of the learner, and the learner at most `slack` env steps' worth of samples
ahead of collection. Each side checks before it acts and may overshoot by one call, so
a chunk larger than the slack can never deadlock the two.
"""

from __future__ import annotations


class RateLimiter:
    def __init__(self, samples_per_insert: float, min_size_to_sample: int, slack_transitions: int):
        self.samples_per_insert = samples_per_insert
        self.min_size_to_sample = min_size_to_sample
        self._min_diff = (min_size_to_sample - slack_transitions) * samples_per_insert
        self._max_diff = (min_size_to_sample + slack_transitions) * samples_per_insert

    def _diff(self, inserts_total: int, sampled_rows: int) -> float:
        return inserts_total * self.samples_per_insert - sampled_rows

    def can_insert(self, inserts_total: int, sampled_rows: int) -> bool:
        return inserts_total < self.min_size_to_sample or self._diff(inserts_total, sampled_rows) <= self._max_diff

    def can_sample(self, inserts_total: int, sampled_rows: int) -> bool:
        return inserts_total >= self.min_size_to_sample and self._diff(inserts_total, sampled_rows) >= self._min_diff
