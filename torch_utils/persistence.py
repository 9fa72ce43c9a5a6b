"""Pickling of objects together with the source code of the module that defines their class.

A class decorated with `persistent_class` pickles as a call to `_reconstruct_persistent_obj(meta)`,
where `meta` holds the full source of the defining module, the class name and the object state.
Unpickling executes that source in a fresh module, so a snapshot keeps working after the code that
wrote it has changed or is gone. This is the format of NVIDIA EDM's network pickles, and the names
`persistent_class` and `_reconstruct_persistent_obj`, the meta keys and `_version = 6` are fixed by
it: pickles written here load in EDM and EDM's load here.

Decorated classes also remember their constructor arguments (`init_args`, `init_kwargs`), which is
what lets `training.checkpoint` rebuild a pickled network on this codebase's own classes.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

_version = 6                # Format version written into every meta dict; EDM asserts equality.
_decorators = set()         # Every class produced by persistent_class.
_import_hooks = []          # Callables meta -> meta applied before a pickled module is executed.
_module_to_src_dict = {}    # Module object -> its source code.
_src_to_module_dict = {}    # Source code -> module executed from it (one module per distinct source).

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle with the source of the class's module embedded.

    Every class of the module that a pickled object refers to (submodules included) must be
    decorated as well, because unpickling looks classes up by name in the re-executed module.
    Set `self._record_init_args = False` in a constructor to skip recording its arguments.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    module_src = _module_to_src(sys.modules[orig_class.__module__])

    # The persistent class is a subclass that records its constructor arguments and reduces to
    # _reconstruct_persistent_obj(meta); everything else is the original class.
    def __init__(self, *args, **kwargs):
        super(persistent, self).__init__(*args, **kwargs)
        _record_init_args(self, args, kwargs)
        _check_pickleable(self.__reduce__())

    def __reduce__(self):
        return _reduce_with_source(self, super(persistent, self).__reduce__())

    namespace = dict(
        __init__=__init__, __reduce__=__reduce__, init_args=_recorded_init_args, init_kwargs=_recorded_init_kwargs,
        _orig_module_src=module_src, _orig_class_name=orig_class.__name__,
        __module__=orig_class.__module__, __qualname__=orig_class.__qualname__, __doc__=orig_class.__doc__,
    )
    persistent = type(orig_class)(orig_class.__name__, (orig_class,), namespace)
    _decorators.add(persistent)
    return persistent

# The attribute names _init_args and _init_kwargs are part of the pickled state that NVIDIA's
# code reads back, so they stay as they are.

def _record_init_args(obj, args, kwargs):
    record = getattr(obj, '_record_init_args', True)
    obj._init_args = copy.deepcopy(args) if record else None
    obj._init_kwargs = copy.deepcopy(kwargs) if record else None

def _recorded(attribute, wrap):
    def getter(self):
        value = getattr(self, attribute)
        assert value is not None, 'constructor arguments were not recorded (_record_init_args = False)'
        return wrap(copy.deepcopy(value))
    return property(getter, doc=f'A copy of the recorded constructor arguments ({attribute}).')

_recorded_init_args = _recorded('_init_args', lambda args: args)
_recorded_init_kwargs = _recorded('_init_kwargs', dnnlib.EasyDict)

def _reduce_with_source(obj, default):
    """Turn the default reduce value (callable, args, state, ...) into _reconstruct_persistent_obj(meta).

    The meta dict carries the module source, the class name and the state that the default
    would have restored; items after the state (list or dict items) pass through. A value that
    already reduces to _reconstruct_persistent_obj (a decorated class's subclass) is kept.
    """
    default = tuple(default) + (None,) * (3 - len(default))
    if default[0] is _reconstruct_persistent_obj:
        return default
    meta = dict(type='class', version=_version, module_src=obj._orig_module_src, class_name=obj._orig_class_name, state=default[2])
    return (_reconstruct_persistent_obj, (meta,), None) + default[3:]

#----------------------------------------------------------------------------

def is_persistent(obj):
    """True for a class made by persistent_class, or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError: # Unhashable objects.
        pass
    return type(obj) in _decorators

def import_hook(hook):
    """Register `hook(meta) -> meta`, called on every persistent object before it is rebuilt.

    Use it to patch pickled source for an API that has changed, e.g. rename an import.
    """
    assert callable(hook)
    _import_hooks.append(hook)
    return hook

#----------------------------------------------------------------------------
# Unpickling entry point. `pickle` calls it with the single meta dict that
# Decorator.__reduce__ wrote (or that NVIDIA's code wrote: the format is the same).

def _reconstruct_persistent_obj(meta):
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, 'an import hook returned None'
    if meta.version != _version:
        raise pickle.UnpicklingError(f'Persistent object format version {meta.version} is not supported (expected {_version})')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'Unknown persistent object type "{meta.type}"')

    module = _src_to_module(meta.module_src)
    if meta.class_name not in module.__dict__:
        raise pickle.UnpicklingError(f'Pickled module source defines no class "{meta.class_name}"')
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

#----------------------------------------------------------------------------

def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src):
    module = _src_to_module_dict.get(src, None)
    if module is None:
        # Registered before exec so that the decorators run by the source itself find it.
        module = types.ModuleType('_imported_module_' + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(compile(src, f'<pickled module {module.__name__}>', 'exec'), module.__dict__)
    return module

def _check_pickleable(obj):
    """Fail at construction, not at the first snapshot, if an argument cannot be pickled."""
    def strip(obj):
        if isinstance(obj, (list, tuple, set)):
            return [strip(x) for x in obj]
        if isinstance(obj, dict):
            return [[strip(k), strip(v)] for k, v in obj.items()]
        if obj is None or isinstance(obj, (str, int, float, bool, bytes, bytearray)):
            return None
        if f'{type(obj).__module__}.{type(obj).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(obj):
            return None # Checked by its own constructor.
        return obj
    with io.BytesIO() as f:
        pickle.dump(strip(obj), f)

#----------------------------------------------------------------------------
