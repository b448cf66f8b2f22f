"""The broker: Kafka consumer, Redis light-curve state, batched inference, triggers.

Modules: ``validate`` (pure checks of decoded alerts), ``state`` (Redis layout and Lua
scripts), ``inference`` (windowing and batched model calls), ``triggers`` (decision and
trigger records), ``metrics`` (Prometheus and the periodic log line), ``consumer`` (the
loop), ``cli_*`` (the ``ulens consume|subscribe|events`` commands).
"""
