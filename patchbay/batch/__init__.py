"""The bulk path of batch syncs: rows in COPY-text frames (`frame.py`) and a flow's steps over them (`transform.py`).

A batch flow's `batch:` block is modelled in `config/batch.py`; the bulk readers and writers of each
database are connectors (`connectors/<kind>_bulk.py`, role "bulk"); `engine/batch.py` runs one sync.
"""
