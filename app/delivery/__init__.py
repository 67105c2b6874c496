"""Durable delivery: the queue policy and the dispatcher that drains it."""
