pytest_plugins = ["tests.fix_database", "tests.reliability.fix_server"]
