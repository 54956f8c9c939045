"""The accuracy metric script (see accuracy.py). The __init__ makes setuptools ship it with the package."""
