//! Status codes and enumerator values of the CANN contract (cann-facts.md 2.3), as the simulator returns them.

pub const ACL_SUCCESS: i32 = 0;
pub const ACL_ERROR_INVALID_PARAM: i32 = 100000;
pub const ACL_ERROR_UNINITIALIZE: i32 = 100001;
pub const ACL_ERROR_REPEAT_INITIALIZE: i32 = 100002;
pub const ACL_ERROR_REPEAT_FINALIZE: i32 = 100037;
pub const ACL_ERROR_BAD_ALLOC: i32 = 200000;
pub const ACL_ERROR_INVALID_DEVICE: i32 = 200002;
pub const ACLNN_ERR_PARAM_NULLPTR: i32 = 161001;
pub const ACLNN_ERR_PARAM_INVALID: i32 = 161002;
pub const ACLNN_ERR_RUNTIME_ERROR: i32 = 361001;
pub const ACLNN_ERR_INNER: i32 = 561000;

pub const ACL_FLOAT: i32 = 0;
pub const ACL_FLOAT16: i32 = 1;
pub const ACL_INT8: i32 = 2;
pub const ACL_INT32: i32 = 3;
pub const ACL_UINT8: i32 = 4;
pub const ACL_INT64: i32 = 9;
pub const ACL_UINT64: i32 = 10;
pub const ACL_BF16: i32 = 27;

pub const ACL_FORMAT_ND: i32 = 2;

pub const ACL_MEMCPY_HOST_TO_HOST: u32 = 0;
pub const ACL_MEMCPY_HOST_TO_DEVICE: u32 = 1;
pub const ACL_MEMCPY_DEVICE_TO_HOST: u32 = 2;
pub const ACL_MEMCPY_DEVICE_TO_DEVICE: u32 = 3;
pub const ACL_MEMCPY_DEFAULT: u32 = 4;
