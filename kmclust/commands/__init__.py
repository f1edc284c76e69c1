"""The ``kmclust`` console command and its subcommands (stage, sweep, report, bench).

Each module holds one entry point's parser and ``main(argv, prog)``; the scripts in jobs/ and
data/ are shims calling the same ``main``.
"""
