"""edcache benchmark suite (not part of the tests). Run: python bench/run.py"""
