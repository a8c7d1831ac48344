//! End-to-end tests of concord live under `tests/`.
