"""Developer tools that live beside the library, not inside the installed ``unite_hf`` package."""
