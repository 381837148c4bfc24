"""Worker entry point: ``python -m gia_bench.train CONFIG.json`` (started by :func:`gia_bench.train.launch`)."""

from gia_bench.train.launch import main

if __name__ == "__main__":
    main()
