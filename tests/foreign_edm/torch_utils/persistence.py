# Minimal stand-in for the other codebase's persistence: strict about the format version.
import copy, inspect, sys, types, uuid
import dnnlib

FORMAT_VERSION = 6
_wrapped = set()
_source_of = {}   # module -> source
_module_of = {}   # source -> module

def persistent_class(cls):
    if cls in _wrapped:
        return cls
    module = sys.modules[cls.__module__]
    if module not in _source_of:
        _source_of[module] = inspect.getsource(module)
    source = _source_of[module]

    class Wrapped(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_kwargs(self):
            return dnnlib.util.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            rebuild, args, state = super().__reduce__()[:3]
            meta = dict(type='class', version=FORMAT_VERSION, module_src=source, class_name=cls.__name__, state=state)
            return (_reconstruct_persistent_obj, (meta,))

    Wrapped.__name__ = cls.__name__
    Wrapped.__module__ = cls.__module__
    _wrapped.add(Wrapped)
    return Wrapped

def _reconstruct_persistent_obj(meta):
    assert meta['version'] == FORMAT_VERSION, meta['version']
    assert meta['type'] == 'class'
    source = meta['module_src']
    if source not in _module_of:
        module = types.ModuleType('_foreign_' + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _source_of[module] = source
        _module_of[source] = module
        exec(source, module.__dict__)
    cls = persistent_class(_module_of[source].__dict__[meta['class_name']])
    obj = cls.__new__(cls)
    obj.__setstate__(dnnlib.util.EasyDict(meta['state']))
    return obj
