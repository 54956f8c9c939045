"""Local evaluate metric modules, loaded by path (no Hub needed). Packages so that setuptools ships them."""
