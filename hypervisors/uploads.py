from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler


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
