"""The portal's only settings file. Every deploy-time value comes from the environment.

Embedded defaults: SQLite in WAL mode and SqliteHuey, both in PORTAL_DATA_DIR,
and a secret key generated once and kept there.
"""

import ipaddress
import os
import secrets
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.env import envbool, envint, envlist, envsecret

BASE_DIR = Path(__file__).resolve().parent.parent
# pytest (8.2+) sets PYTEST_VERSION for the session and every process it starts,
# so a test run never shares a database or a queue with a portal started by `make run`.
TESTING = "PYTEST_VERSION" in os.environ

# What the portal writes (database, queue, secret key, uploads, images, keys) is readable by its own user only:
# every portal process (manage.py and its commands, gunicorn's config.wsgi) loads this module before it
# creates a file, and the data directory itself is closed to others, which also covers files made before.
# The test harness keeps its caller's umask (its fixtures make TFTP roots for dnsmasq, which drops privileges);
# the portal processes it starts do not import pytest and get the portal's.
if "pytest" not in sys.modules:
    os.umask(0o077)
DATA_DIR = Path(os.getenv("PORTAL_DATA_DIR", str(BASE_DIR / "var" / ("test" if TESTING else "")))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
if DATA_DIR.stat().st_uid == os.getuid() and DATA_DIR.stat().st_mode & 0o077:
    DATA_DIR.chmod(0o700)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated on first start and kept."""
    key = envsecret("PORTAL_SECRET_KEY", "")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = envbool("PORTAL_DEBUG", "False")
ALLOWED_HOSTS = envlist("PORTAL_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("PORTAL_CSRF_TRUSTED_ORIGINS", "")
# Security headers (portal/security.py writes the Content-Security-Policy): no page framed, no MIME sniffing,
# referrers sent only to the portal itself; behind TLS, cookies only over TLS and HSTS for PORTAL_HSTS_SECONDS
# (0: none), sent by Django's SecurityMiddleware on the requests the proxy says came over https.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
PORTAL_HSTS_SECONDS = envint("PORTAL_HSTS_SECONDS", "31536000")
if envbool("PORTAL_BEHIND_TLS_PROXY", "False"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = PORTAL_HSTS_SECONDS

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "rest_framework",
    "drf_spectacular",
    "huey.contrib.djhuey",
    "portal",
    "hypervisors",
    "machines",
    "labs",
    "metrics",
    "workflows",
    "config",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "portal.audit.AuditMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite in WAL mode (readers and the writer run at once) unless DATABASE_URL points elsewhere, e.g.
# postgres://portal:secret@db.example.org/portal
DATABASES = {
    "default": dj_database_url.parse(
        os.getenv("DATABASE_URL", f"sqlite:///{DATA_DIR / 'portal.sqlite3'}"),
        conn_max_age=envint("PORTAL_DB_CONN_MAX_AGE", "0"),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Writers wait for each other instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-portal.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# Log-ins and API tokens (portal/throttle.py): failed attempts within PORTAL_LOGIN_LOCKOUT_MINUTES lock out one
# user name from one address (PORTAL_LOGIN_MAX_FAILURES), one user name from everywhere (..._PER_USER) and one
# address, password and token failures alike (..._PER_ADDRESS), until the oldest of them is that old.
PORTAL_LOGIN_LOCKOUT_MINUTES = envint("PORTAL_LOGIN_LOCKOUT_MINUTES", "15")
PORTAL_LOGIN_MAX_FAILURES = envint("PORTAL_LOGIN_MAX_FAILURES", "5")
PORTAL_LOGIN_MAX_FAILURES_PER_USER = envint("PORTAL_LOGIN_MAX_FAILURES_PER_USER", "20")
PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS = envint("PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS", "50")
if (
    min(PORTAL_LOGIN_LOCKOUT_MINUTES, PORTAL_LOGIN_MAX_FAILURES) < 1
    or min(PORTAL_LOGIN_MAX_FAILURES_PER_USER, PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS) < PORTAL_LOGIN_MAX_FAILURES
):
    raise ImproperlyConfigured(
        "PORTAL_LOGIN_LOCKOUT_MINUTES and PORTAL_LOGIN_MAX_FAILURES are at least 1, and the per-user and "
        "per-address limits at least PORTAL_LOGIN_MAX_FAILURES"
    )
# The throttle refuses a locked-out log-in before the password is checked; it authenticates nobody.
AUTHENTICATION_BACKENDS = ["portal.throttle.LoginThrottleBackend", "django.contrib.auth.backends.ModelBackend"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.getenv("PORTAL_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # WhiteNoise warns about a missing root before collectstatic
# Only the parts of the npm packages the pages load (bootstrap-icons alone ships 2,000 SVGs).
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/bootstrap/dist", BASE_DIR / "node_modules/bootstrap/dist"),
    ("vendor/bootstrap-icons/font", BASE_DIR / "node_modules/bootstrap-icons/font"),
    # noVNC's ES modules, as they are: core/ imports ../vendor/pako.
    ("vendor/novnc/core", BASE_DIR / "node_modules/@novnc/novnc/core"),
    ("vendor/novnc/vendor", BASE_DIR / "node_modules/@novnc/novnc/vendor"),
    # xterm.js for the serial console, as ES modules.
    ("vendor/xterm/lib", BASE_DIR / "node_modules/@xterm/xterm/lib"),
    ("vendor/xterm/css", BASE_DIR / "node_modules/@xterm/xterm/css"),
    ("vendor/xterm-fit/lib", BASE_DIR / "node_modules/@xterm/addon-fit/lib"),
    # uPlot for the metrics graphs (its dist: the ES module, the IIFE build and the stylesheet).
    ("vendor/uplot/dist", BASE_DIR / "node_modules/uplot/dist"),
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api_auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # DRF's parsers, with JSON nesting bounded (portal/api_parsers.py): a deep body is a 400, not a 500.
    "DEFAULT_PARSER_CLASSES": [
        "portal.api_parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.pagination.Pagination",  # DRF's limit/offset, limit capped at 1000
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "AnsiStack Portal API",
    "DESCRIPTION": "Cloud-like virtual machines on plain libvirt hypervisors.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The enum hook is drf-spectacular's default; the second adds the 400/401/403/404 that DRF answers for any
    # view, which drf-spectacular leaves out (portal/api_schema.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "portal.api_schema.add_error_responses",
    ],
}

# Huey: SQLite next to the database by default, Redis when PORTAL_REDIS_URL is set.
_redis_url = os.getenv("PORTAL_REDIS_URL", "")
HUEY = {
    "name": "portal",
    # Never default to DEBUG (djhuey does): that would run hypervisor calls in web requests.
    "immediate": envbool("PORTAL_HUEY_IMMEDIATE", "False"),
    "utc": True,
    "consumer": {
        "workers": envint("PORTAL_WORKERS", "4"),
        "worker_type": "thread",
        "periodic": True,
        "check_worker_health": True,
        # Idle workers poll the embedded queue; Huey's default backoff lets that grow to 10 s,
        # which is how long a new machine would wait to be picked up.
        "initial_delay": 0.05,
        "backoff": 1.15,
        "max_delay": 0.1,
    },
}
if _redis_url:
    HUEY.update({"huey_class": "huey.RedisHuey", "url": _redis_url})
else:
    HUEY.update({"huey_class": "huey.SqliteHuey", "filename": str(DATA_DIR / "huey.sqlite3")})

# Hypervisors.
# URI schemes a hypervisor may use; `test` (libvirt's in-memory driver) only for DEBUG or tests.
PORTAL_ALLOW_TEST_URIS = envbool("PORTAL_ALLOW_TEST_URIS", str(DEBUG or TESTING))
PORTAL_SYNC_INTERVAL = envint("PORTAL_SYNC_INTERVAL", "20")  # seconds between hypervisor syncs
PORTAL_CONNECT_TIMEOUT = envint("PORTAL_CONNECT_TIMEOUT", "8")  # seconds to reach a remote hypervisor
PORTAL_LOCAL_HYPERVISOR_URI = os.getenv("PORTAL_LOCAL_HYPERVISOR_URI", "qemu:///system")

# Images: where the portal keeps them, and caps on what it accepts.
PORTAL_IMAGE_DIR = DATA_DIR / "images"
PORTAL_IMAGE_DIR.mkdir(exist_ok=True)
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "uploads")  # same file system as the images: a finished upload is renamed
Path(FILE_UPLOAD_TEMP_DIR).mkdir(exist_ok=True)
FILE_UPLOAD_PERMISSIONS = 0o600
# Every request keeps Django's small in-memory limits (DATA_UPLOAD_MAX_MEMORY_SIZE, FILE_UPLOAD_MAX_MEMORY_SIZE) and
# never writes a file to disk; only the image upload views, once they know a staff user, spool large files.
FILE_UPLOAD_HANDLERS = ["hypervisors.uploads.SmallUploadHandler"]
PORTAL_IMAGE_MAX_FILE_GIB = envint("PORTAL_IMAGE_MAX_FILE_GIB", "50")
PORTAL_IMAGE_MAX_VIRTUAL_GIB = envint("PORTAL_IMAGE_MAX_VIRTUAL_GIB", "2048")
PORTAL_QEMU_IMG_CPU_SECONDS = envint("PORTAL_QEMU_IMG_CPU_SECONDS", "30")
PORTAL_QEMU_IMG_MEMORY_MIB = envint("PORTAL_QEMU_IMG_MEMORY_MIB", "1024")

# Imports from a URL: destinations that are not public (loopback, link-local, private, multicast, unspecified,
# reserved; checked on every redirect hop after DNS) are refused unless one of these CIDRs names them; the whole
# import has a deadline (seconds) and a size cap (bytes, and never over PORTAL_IMAGE_MAX_FILE_GIB).
PORTAL_IMPORT_ALLOWED_NETWORKS = envlist("PORTAL_IMPORT_ALLOWED_NETWORKS", "")
PORTAL_IMPORT_TIMEOUT = envint("PORTAL_IMPORT_TIMEOUT", "7200")
PORTAL_IMPORT_MAX_BYTES = envint("PORTAL_IMPORT_MAX_BYTES", "53687091200")  # 50 GiB
try:
    _import_networks = [ipaddress.ip_network(n, strict=False) for n in PORTAL_IMPORT_ALLOWED_NETWORKS]
except ValueError as e:
    raise ImproperlyConfigured(f"PORTAL_IMPORT_ALLOWED_NETWORKS: {e}") from None
if PORTAL_IMPORT_TIMEOUT < 1 or PORTAL_IMPORT_MAX_BYTES < 1:
    raise ImproperlyConfigured("PORTAL_IMPORT_TIMEOUT and PORTAL_IMPORT_MAX_BYTES are at least 1")

# SSH keys fetched from a URL or a short name (gh:<user>, lp:<user>) by the worker, through the import client (so
# PORTAL_IMPORT_ALLOWED_NETWORKS applies): https only unless http is allowed, a CA bundle trusted besides the
# system's (an internal key server's CA), the whole fetch's deadline (seconds) and its size cap (bytes).
PORTAL_SSH_KEY_ALLOW_HTTP = envbool("PORTAL_SSH_KEY_ALLOW_HTTP", "false")
PORTAL_SSH_KEY_CA_FILE = os.environ.get("PORTAL_SSH_KEY_CA_FILE", "")
PORTAL_SSH_KEY_TIMEOUT = envint("PORTAL_SSH_KEY_TIMEOUT", "20")
PORTAL_SSH_KEY_MAX_BYTES = envint("PORTAL_SSH_KEY_MAX_BYTES", "65536")
if PORTAL_SSH_KEY_TIMEOUT < 1 or PORTAL_SSH_KEY_MAX_BYTES < 1:
    raise ImproperlyConfigured("PORTAL_SSH_KEY_TIMEOUT and PORTAL_SSH_KEY_MAX_BYTES are at least 1")

# Machines.
PORTAL_PROVISION_TIMEOUT = envint("PORTAL_PROVISION_TIMEOUT", "900")  # seconds a machine may stay busy
PORTAL_PROVISION_RETRIES = envint("PORTAL_PROVISION_RETRIES", "4")  # retries of a transient hypervisor error
# Default quota of each (non-staff) user; staff set others per user in the admin.
PORTAL_QUOTA_MACHINES = envint("PORTAL_QUOTA_MACHINES", "10")
PORTAL_QUOTA_VCPUS = envint("PORTAL_QUOTA_VCPUS", "20")
PORTAL_QUOTA_MEMORY_MIB = envint("PORTAL_QUOTA_MEMORY_MIB", "32768")
PORTAL_QUOTA_DISK_GIB = envint("PORTAL_QUOTA_DISK_GIB", "500")
PORTAL_MAC_PREFIX = os.getenv("PORTAL_MAC_PREFIX", "52:54:00")  # generated MACs start with this (AnsiStack's mac_seed)
# The libvirt network every user may put machines on (the default NIC): a network the portal defines
# on a hypervisor (mode "tenant"), isolated from the hypervisor by the portal's traffic filter.
PORTAL_TENANT_NETWORK = os.getenv("PORTAL_TENANT_NETWORK", "portal-tenants")

# Consoles: the websockify proxy and its tokens.
PORTAL_CONSOLE_HOST = os.getenv("PORTAL_CONSOLE_HOST", "127.0.0.1")
PORTAL_CONSOLE_PORT = envint("PORTAL_CONSOLE_PORT", "6080")
# The websocket URL browsers use, when a reverse proxy puts the console elsewhere
# (e.g. wss://portal.example.org/console); empty: ws(s)://<page host>:PORTAL_CONSOLE_PORT
PORTAL_CONSOLE_URL = os.getenv("PORTAL_CONSOLE_URL", "")
# Origins allowed to open consoles; empty: the portal's own (http://<allowed host>:PORTAL_PORT).
PORTAL_CONSOLE_ALLOWED_ORIGINS = envlist("PORTAL_CONSOLE_ALLOWED_ORIGINS", "")
PORTAL_CONSOLE_TOKEN_TTL = envint("PORTAL_CONSOLE_TOKEN_TTL", "60")  # seconds a token lives unused
# Seconds after its first use in which a token reconnects, and only with the reconnect secret that came with it.
PORTAL_CONSOLE_RECONNECT_GRACE = envint("PORTAL_CONSOLE_RECONNECT_GRACE", "10")
# Open sessions per machine: those that may type (operators, owners, staff; serial sessions too) and view-only
# ones are counted apart, so viewers cannot lock an operator out. Per user: all of their sessions.
PORTAL_CONSOLE_MAX_PER_MACHINE = envint("PORTAL_CONSOLE_MAX_PER_MACHINE", "2")
PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE = envint("PORTAL_CONSOLE_MAX_VIEWERS_PER_MACHINE", "4")
PORTAL_CONSOLE_MAX_PER_USER = envint("PORTAL_CONSOLE_MAX_PER_USER", "4")
PORTAL_CONSOLE_MAX_SESSION = envint("PORTAL_CONSOLE_MAX_SESSION", "28800")  # seconds; the proxy then closes the session
if PORTAL_CONSOLE_MAX_SESSION < 1 or PORTAL_CONSOLE_RECONNECT_GRACE < 0:
    raise ImproperlyConfigured(
        "PORTAL_CONSOLE_MAX_SESSION is at least 1 s and PORTAL_CONSOLE_RECONNECT_GRACE at least 0"
    )
# Screenshots the minute's reconcile asks for, stalest first (open machine pages ask for their own).
# Who may pass a hypervisor's PCI/USB devices to a machine: "staff" (default) or "everyone". A device
# taken from the host (managed='yes' detaches it) can cut the host off its own network or disks.
PORTAL_HOST_DEVICES_FOR = os.getenv("PORTAL_HOST_DEVICES_FOR", "staff")
if PORTAL_HOST_DEVICES_FOR not in ("staff", "everyone"):
    raise ImproperlyConfigured("PORTAL_HOST_DEVICES_FOR is staff or everyone")
# Who may move a machine to another hypervisor: staff only, or also its owner and project admins.
PORTAL_MIGRATION_FOR = os.getenv("PORTAL_MIGRATION_FOR", "staff")
if PORTAL_MIGRATION_FOR not in ("staff", "owners"):
    raise ImproperlyConfigured("PORTAL_MIGRATION_FOR is staff or owners")
# Seconds a move that restarts a running machine (or an evacuation) waits for its guest to shut down before it
# powers it off.
PORTAL_MOVE_SHUTDOWN_TIMEOUT = envint("PORTAL_MOVE_SHUTDOWN_TIMEOUT", "120")
# A live move: the guest's pause at the switch is bounded by this (ms); the whole move gives up after this (s).
PORTAL_LIVE_MIGRATION_DOWNTIME_MS = envint("PORTAL_LIVE_MIGRATION_DOWNTIME_MS", "300")
PORTAL_LIVE_MIGRATION_TIMEOUT = envint("PORTAL_LIVE_MIGRATION_TIMEOUT", "600")
# A live move's streams at most this many MiB/s (0: as fast as the network goes), so a move leaves room for the rest.
PORTAL_LIVE_MIGRATION_BANDWIDTH_MIB_S = envint("PORTAL_LIVE_MIGRATION_BANDWIDTH_MIB_S", "0")
if (
    PORTAL_LIVE_MIGRATION_DOWNTIME_MS < 1
    or PORTAL_LIVE_MIGRATION_TIMEOUT < 1
    or PORTAL_LIVE_MIGRATION_BANDWIDTH_MIB_S < 0
):
    raise ImproperlyConfigured(
        "PORTAL_LIVE_MIGRATION_DOWNTIME_MS and PORTAL_LIVE_MIGRATION_TIMEOUT are at least 1, the bandwidth at least 0"
    )
# At most this many provisions, rebuilds, grows, deletes and moves run on one hypervisor at a time; more wait.
PORTAL_HYPERVISOR_CONCURRENCY = envint("PORTAL_HYPERVISOR_CONCURRENCY", "4")
if PORTAL_HYPERVISOR_CONCURRENCY < 1:
    raise ImproperlyConfigured("PORTAL_HYPERVISOR_CONCURRENCY is at least 1")
# Workflow runs (workflows/): at most this many queued or running per project and per hypervisor (a run counts on
# every hypervisor one of its machines is on); more are refused until one ends. A run may take this long (s) before
# it is stopped, and a git workflow's checkout this long (s). Each run has a private directory (0700) under
# PORTAL_WORKFLOW_RUN_DIR, removed when it ends.
PORTAL_WORKFLOW_RUNS_PER_PROJECT = envint("PORTAL_WORKFLOW_RUNS_PER_PROJECT", "4")
PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR = envint("PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR", "4")
PORTAL_WORKFLOW_TIMEOUT = envint("PORTAL_WORKFLOW_TIMEOUT", "3600")
PORTAL_WORKFLOW_GIT_TIMEOUT = envint("PORTAL_WORKFLOW_GIT_TIMEOUT", "120")
if min(PORTAL_WORKFLOW_RUNS_PER_PROJECT, PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR, PORTAL_WORKFLOW_TIMEOUT) < 1:
    raise ImproperlyConfigured(
        "PORTAL_WORKFLOW_RUNS_PER_PROJECT, PORTAL_WORKFLOW_RUNS_PER_HYPERVISOR and PORTAL_WORKFLOW_TIMEOUT are at least 1"
    )
if PORTAL_WORKFLOW_GIT_TIMEOUT < 1:
    raise ImproperlyConfigured("PORTAL_WORKFLOW_GIT_TIMEOUT is at least 1")
PORTAL_WORKFLOW_RUN_DIR = DATA_DIR / "workflow-runs"
# The worker records a heartbeat this often (s); the dashboard and /healthz call it stopped when the
# last one is older than PORTAL_WORKER_STALE_AFTER (s).
PORTAL_WORKER_HEARTBEAT = envint("PORTAL_WORKER_HEARTBEAT", "30")
PORTAL_WORKER_STALE_AFTER = envint("PORTAL_WORKER_STALE_AFTER", "120")
PORTAL_SCREENSHOTS_PER_MINUTE = envint("PORTAL_SCREENSHOTS_PER_MINUTE", "30")
# Metrics (metrics/collect.py, metrics/rollup.py): one-minute points are kept this many hours, hourly ones this
# many days; the hourly rollup deletes older ones.
PORTAL_METRICS_MINUTE_RETENTION_HOURS = envint("PORTAL_METRICS_MINUTE_RETENTION_HOURS", "24")
PORTAL_METRICS_HOUR_RETENTION_DAYS = envint("PORTAL_METRICS_HOUR_RETENTION_DAYS", "90")
if PORTAL_METRICS_MINUTE_RETENTION_HOURS < 2 or PORTAL_METRICS_HOUR_RETENTION_DAYS < 1:
    raise ImproperlyConfigured(
        "PORTAL_METRICS_MINUTE_RETENTION_HOURS is at least 2 (the rollup needs the last complete hour's minutes) "
        "and PORTAL_METRICS_HOUR_RETENTION_DAYS at least 1"
    )

# The sweeper (machines/services/sweeper.py): domains and volumes the portal made that no machine row owns are
# reported on the hypervisor page only once first seen this many seconds ago, by an earlier sweep.
PORTAL_ORPHAN_GRACE = envint("PORTAL_ORPHAN_GRACE", "600")

# GET /metrics (metrics/exporter.py): read with `Authorization: Bearer <PORTAL_METRICS_TOKEN>` (empty: no token
# works), from an address in PORTAL_METRICS_ALLOWED_NETWORKS (CIDRs; empty: none), or by a staff session.
# The address is REMOTE_ADDR, never X-Forwarded-For: behind a reverse proxy every caller has the proxy's, so use the token.
PORTAL_METRICS_TOKEN = envsecret("PORTAL_METRICS_TOKEN", "")
PORTAL_METRICS_ALLOWED_NETWORKS = envlist("PORTAL_METRICS_ALLOWED_NETWORKS", "")
try:
    _metrics_networks = [ipaddress.ip_network(n, strict=False) for n in PORTAL_METRICS_ALLOWED_NETWORKS]
except ValueError as e:
    raise ImproperlyConfigured(f"PORTAL_METRICS_ALLOWED_NETWORKS: {e}") from None

# Leases (machines/services/leases.py): the owner is warned this many hours before a machine's lease ends; at
# the end it is shut down (powered off if still running PORTAL_LEASE_POWEROFF_AFTER s later), and deleted this many
# hours after. The worker checks every minute, or every PORTAL_LEASE_CHECK_INTERVAL s within it.
PORTAL_LEASE_WARN_HOURS = envint("PORTAL_LEASE_WARN_HOURS", "24")
try:  # hours, fractions allowed (the integration test deletes 18 s after the shut-down)
    PORTAL_LEASE_DELETE_AFTER_HOURS = float(os.getenv("PORTAL_LEASE_DELETE_AFTER_HOURS", "72"))
except ValueError:
    raise ImproperlyConfigured("PORTAL_LEASE_DELETE_AFTER_HOURS is a number of hours") from None
PORTAL_LEASE_POWEROFF_AFTER = envint("PORTAL_LEASE_POWEROFF_AFTER", "300")
PORTAL_LEASE_CHECK_INTERVAL = envint("PORTAL_LEASE_CHECK_INTERVAL", "60")
if min(PORTAL_LEASE_WARN_HOURS, PORTAL_LEASE_DELETE_AFTER_HOURS, PORTAL_LEASE_POWEROFF_AFTER) < 0:
    raise ImproperlyConfigured("PORTAL_LEASE_WARN_HOURS, _DELETE_AFTER_HOURS and _POWEROFF_AFTER are at least 0")
if not 1 <= PORTAL_LEASE_CHECK_INTERVAL <= 60:
    raise ImproperlyConfigured("PORTAL_LEASE_CHECK_INTERVAL is 1 to 60 seconds")
# Scheduled actions (labs/schedules.py): a run missed by more than this many minutes (the worker was down) is
# skipped, not run late.
PORTAL_SCHEDULE_CATCH_UP_MINUTES = envint("PORTAL_SCHEDULE_CATCH_UP_MINUTES", "60")
# Mail (the lease warnings), through Django's SMTP backend.
EMAIL_HOST = os.getenv("PORTAL_EMAIL_HOST", "localhost")
EMAIL_PORT = envint("PORTAL_EMAIL_PORT", "25")
EMAIL_HOST_USER = os.getenv("PORTAL_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = envsecret("PORTAL_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = envbool("PORTAL_EMAIL_USE_TLS", "False")
EMAIL_TIMEOUT = 20
DEFAULT_FROM_EMAIL = os.getenv("PORTAL_EMAIL_FROM", "portal@localhost")

# Virtual BMCs of network-boot machines (served by manage.py bmc_server).
PORTAL_BMC_ADDRESS = os.getenv("PORTAL_BMC_ADDRESS", "127.0.0.1")  # never :: or 0.0.0.0 by default
PORTAL_BMC_PORT_RANGE = os.getenv("PORTAL_BMC_PORT_RANGE", "6230-6329")

PORTAL_SELF_REGISTRATION = envbool("PORTAL_SELF_REGISTRATION", "False")  # off: staff create users in the admin

PORTAL_HOST = os.getenv("PORTAL_HOST", "127.0.0.1")
PORTAL_PORT = envint("PORTAL_PORT", "8000")

if not PORTAL_CONSOLE_ALLOWED_ORIGINS:
    PORTAL_CONSOLE_ALLOWED_ORIGINS = [
        f"{scheme}://{host}{'' if port in ('80', '443') else ':' + port}"
        for host in ALLOWED_HOSTS
        if host not in ("*",) and not host.startswith(".")
        for scheme, port in (("http", str(PORTAL_PORT)), ("https", str(PORTAL_PORT)))
    ]

if PORTAL_SYNC_INTERVAL < 5:
    raise ImproperlyConfigured("PORTAL_SYNC_INTERVAL must be at least 5 seconds")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.getenv("PORTAL_LOG_LEVEL", "INFO")},
    # run_huey adds its own handler to "huey"; do not print each line twice.
    "loggers": {"huey": {"level": "INFO", "propagate": False}, "websockify": {"level": "WARNING"}},
}

if TESTING:
    # Fast hashing keeps the suite quick; production keeps Django's default.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
