"""A small Sphinx extension for the book's HTML (listed under `sphinx: local_extensions` in _config.yml).

Jupyter Book's thebe support (sphinx-thebe) registers its inline configuration script in a way
that Sphinx 7 adds to every page twice, which makes the browser report
"Identifier 'THEBE_JS_URL' has already been declared". This drops exact duplicate scripts from
each page just before it is written.
"""

from __future__ import annotations


def _script_key(js) -> tuple:
    return (str(getattr(js, "filename", js) or ""),
            tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))


def drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        key = _script_key(js)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
