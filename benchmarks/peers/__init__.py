"""Peer workers: scripts run as their own processes (`python peers/<name>_worker.py --spec JSON`)."""
