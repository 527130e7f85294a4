# IOCPNATIVE_SANITIZE=address|undefined|thread: one at a time (ASan and TSan cannot be combined).
# "address" also turns on UBSan, as the two combine; LeakSanitizer comes with ASan on Linux.
if(IOCPNATIVE_SANITIZE)
  if(MSVC)
    message(FATAL_ERROR "IOCPNATIVE_SANITIZE is supported with GCC/Clang only")
  endif()
  if(IOCPNATIVE_SANITIZE STREQUAL "address")
    set(_san "-fsanitize=address,undefined")
  elseif(IOCPNATIVE_SANITIZE STREQUAL "undefined")
    set(_san "-fsanitize=undefined")
  elseif(IOCPNATIVE_SANITIZE STREQUAL "thread")
    set(_san "-fsanitize=thread")
  else()
    message(FATAL_ERROR "IOCPNATIVE_SANITIZE must be address, undefined or thread, "
                        "got '${IOCPNATIVE_SANITIZE}'")
  endif()
  add_compile_options(${_san} -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(${_san})
endif()
