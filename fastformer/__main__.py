"""`python -m fastformer` is the same program as the `fastformer` console script."""

import sys


def _real_package() -> None:
    """Make `fastformer` the package this file belongs to.

    Run from a folder that holds a folder named `fastformer` without an `__init__.py` (the parent of a
    clone, say), Python takes that folder for a namespace package before it consults an editable
    install's import hook; the hook then still finds this file, but `fastformer` itself is empty. Load
    the real package from this file's folder in its place.
    """
    import importlib.util
    from pathlib import Path

    package = sys.modules.get("fastformer")
    if package is not None and getattr(package, "__file__", None) is not None:
        return
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "fastformer", here / "__init__.py", submodule_search_locations=[str(here)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastformer"] = module
    spec.loader.exec_module(module)


_real_package()

from fastformer.cli import main  # noqa: E402

sys.exit(main())
