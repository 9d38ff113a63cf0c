pytest_plugins = ["tests.fix_database", "tests.fix_signals", "tests.reliability.fix_server"]
