"""nn.Modules, their config dataclasses and the on-disk checkpoint format. No tracker or network I/O."""
