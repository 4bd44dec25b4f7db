"""Upload handlers: every request keeps Django's small in-memory limits; only the image upload views, after their
access check, spool large files to disk.

Django parses a multipart body the first time anything reads request.POST, and CsrfViewMiddleware does that
for every POST that carries a CSRF cookie, before any view or access check runs. So the default handler
(FILE_UPLOAD_HANDLERS) must never write to disk, and the upload views switch handlers before the CSRF check
reads the body (Django's documented pattern: csrf_exempt outside, csrf_protect inside).
"""

from functools import wraps

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.core.files.uploadhandler import MemoryFileUploadHandler, StopUpload, TemporaryFileUploadHandler
from django.views.decorators.csrf import csrf_exempt, csrf_protect


class SmallUploadHandler(MemoryFileUploadHandler):
    """The default: files are held in memory, at most FILE_UPLOAD_MAX_MEMORY_SIZE for the whole request;
    past that the upload stops (and the connection is dropped). Nothing is written to disk."""

    def __init__(self, request=None):
        super().__init__(request)
        self.received = 0

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        # Always in memory (the stock handler hands a large body on to a disk handler); the cap is below.
        self.activated = True

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)


class CappedTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    """Streams every upload to a temporary file (never into memory) and stops at the size cap."""

    def new_file(self, *args, **kwargs):
        self.received = 0
        super().new_file(*args, **kwargs)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > settings.PORTAL_IMAGE_MAX_FILE_GIB << 30:
            self.file.close()
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)


def allow_large_upload(request) -> None:
    """Let this request (an authenticated staff user's, at an image upload endpoint) spool its files to disk.
    No-op once the body has been parsed."""
    if not (request.user.is_authenticated and request.user.is_staff):
        raise PermissionDenied("Large uploads are for staff only.")
    if not hasattr(request, "_files"):
        request.upload_handlers = [CappedTemporaryFileUploadHandler(request)]


def spools_large_uploads(view):
    """For a view already behind its access check (place it under @staff_required): its POSTs may spool large
    files to disk. CSRF is still checked, after the handlers are switched."""
    protected = csrf_protect(view)

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.method == "POST":
            allow_large_upload(request)
        return protected(request, *args, **kwargs)

    return csrf_exempt(wrapper)
