-- One row per order; amounts in cents stay integers.
select
    cast(id as bigint) as order_id,
    cast(user_id as bigint) as user_id,
    status,
    cast(items as integer) as items,
    cast(amount_cents as bigint) as amount_cents,
    ordered_at
from {{ source('raw', 'orders') }}
