"""The parts of token leasing, behind :class:`~equalizer.buckets.leasing.LeasingStore`.

Imports run one way: :mod:`.allowances` (what this instance holds per key) knows
nothing of the others; :mod:`.answers` (what a settlement's rows mean) uses it;
:mod:`.settlement` (batching, sending and ordering statements) uses both;
:mod:`.sweep` (releasing idle keys) and :mod:`.admin` (reads that count the leased
tokens, writes that win over leases) use those.
"""
