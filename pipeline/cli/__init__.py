"""The ``treepo`` command-line tools (``main``): status, config check (``preflight``), export of a
checkpoint, tree view. No process module imports them."""
