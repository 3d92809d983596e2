//! Client SDK tests against a real daemon.
