pytest_plugins = ["tests.fix_database"]
