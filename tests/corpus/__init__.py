"""The corpora every verdict is measured against (issue 20, item 8).

``healthy.HEALTHY``: correct, healthy programs of many loss families and training setups, on
which every callback of the library at its defaults must raise no WARN or FAIL.
``bugs.BUGS``: the silent bugs people really make, planted one at a time into a healthy
program, each with the finding code(s) it must be flagged with. ``runner`` fits a program with
every callback and reads back what they found; ``tests/test_corpus_healthy.py`` and
``tests/test_corpus_bugs.py`` run both in the suite; ``benchmarks/corpus_report.py`` measures
them (false alarms per family, bugs caught, every threshold's margin on healthy programs).
"""
