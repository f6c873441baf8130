"""```python
from weightdrop.core import *
from weightdrop.dropout import *
from weightdrop.noise import *
from weightdrop.gates import *
from weightdrop.gate_callbacks import *
from weightdrop.mutate import *
from weightdrop.mutate_callbacks import *
from weightdrop.awdlstm import *
from weightdrop.callbacks import *
```

```python
from weightdrop import core, dropout, noise, gates as _gates, gate_callbacks, mutate as _mutate, mutate_callbacks, awdlstm, callbacks
__all__ = [n for m in (core, dropout, noise, _gates, gate_callbacks, _mutate, mutate_callbacks, awdlstm, callbacks) for n in m.__all__]
```"""

__version__ = "0.1.0"
