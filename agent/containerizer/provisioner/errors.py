"""The provisioner's one error type."""


class ImageError(Exception):
    """An image that cannot be provisioned, with a message its user can act on (it becomes
    the task's TASK_FAILED message, REASON_CONTAINER_LAUNCH_FAILED)."""
