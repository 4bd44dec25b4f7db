"""Hypervisor drivers. Only libvirt_driver and its connections and serial_stream modules import libvirt."""

from django.conf import settings
from django.utils.module_loading import import_string

from hypervisors.drivers.base import HypervisorDriver

DRIVERS = {"libvirt": "hypervisors.drivers.libvirt_driver.LibvirtDriver"}


def get_driver(uri: str, driver: str = "libvirt") -> HypervisorDriver:
    return import_string(DRIVERS[driver])(uri, connect_timeout=settings.PORTAL_CONNECT_TIMEOUT)
