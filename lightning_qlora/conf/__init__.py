"""Hydra configs of the app (a package so Hydra finds them in an installed wheel as well)."""
