"""Replay: a dataset or archival light curves as a time-ordered Avro alert stream into Kafka.

``stream`` (pure: ids, fluxes, order, history, truth), ``photometry_files`` (archival
tables), ``producer`` (Kafka I/O and pacing), ``cli`` (`ulens replay`).
"""
