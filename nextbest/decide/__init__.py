"""The next-best-action decision: candidates, rules, pool, slate, offers, exploration."""
