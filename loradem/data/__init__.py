"""Rows in, splits out: reading and checking data files, the generated demo tasks, anchor rows."""
