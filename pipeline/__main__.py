"""`python -m pipeline`: the `samba` command, imported from the folder Python starts in.

dvc.yaml runs its stages this way. DVC runs a `--temp` or queued experiment in a copy of
the repository, and `python -m` puts that copy first on sys.path. The stage then runs the
code the experiment committed, not the copy the `samba` script was installed from.
"""

from pipeline.cli import app

app(prog_name="samba")
