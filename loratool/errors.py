"""User-facing errors. The CLI prints the message on one line and exits with `exit_code`."""


class LoratoolError(Exception):
    """A problem the user can fix; the message says what to do."""

    exit_code = 1


class ModelSourceError(LoratoolError):
    """A --model/--refiner/--vae argument that cannot be loaded."""


class LoraFileError(LoratoolError):
    """A LoRA file that is missing, corrupt, unsupported or does not fit the model."""


class InputError(LoratoolError):
    """A bad option value or input file."""


class OutputExistsError(LoratoolError):
    """Refusing to overwrite an existing output without --force."""


class NonFiniteRender(LoratoolError):
    """A render whose pixels came out NaN or infinite (a LoRA too strong at its scale, or an fp16 VAE that
    overflowed), refused instead of saved as the black image diffusers' 8-bit cast would make of it."""
