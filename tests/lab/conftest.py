"""``check_lab.py`` drives a browser (``make check-lab``); it is not a pytest module, and
``--doctest-modules`` must not import it (it needs selenium, which ``make test`` does not)."""

collect_ignore = ["check_lab.py"]
