"""The autoscaler: pure policy (decide), the observe/decide/actuate loop, signals."""
