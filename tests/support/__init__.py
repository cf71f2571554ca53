"""Helpers the tests share: ports, services, serving homes, model fixtures, server start-up.

Test modules import shared code from here (and fixtures from the conftest files), never from
each other, so a test module can move or change without breaking another.
"""
